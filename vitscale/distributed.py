"""Process-group start from any launcher, and the pipe x tensor x data topology.

The only module that reads launcher environment variables. Supported launchers:

- ``deepspeed`` and ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are set.
- SLURM ``srun`` (one task per device): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID,
  master = first host of the step's node list (MASTER_ADDR/MASTER_PORT override).
- ``mpirun`` (OpenMPI, MPICH/Hydra, Intel MPI): DeepSpeed's MPI discovery through
  mpi4py fills RANK etc. in ``deepspeed.init_distributed``.
- nothing: a single process.

The grid is DeepSpeed's own ``PipelineParallelGrid`` over a
``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``, so DeepSpeed and our
parallel layers share one set of process groups.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# No module-level torch import: tools that only need the launcher's ranks (vitscale-synth)
# import this module without paying for torch.

logger = logging.getLogger(__name__)

Launcher = Literal["env", "slurm", "mpi", "single"]

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def detect_launcher() -> Launcher:
    """Which launcher started this process (decided from the environment only)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if any(v in env for v in _MPI_RANK_VARS):
        return "mpi"
    # Inside an sbatch script but outside srun, SLURM_PROCID is 0 of SLURM_NTASKS too:
    # only a job step (SLURM_STEP_ID) is a set of ranks.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "single"


def world_size_from_env() -> int:
    """Number of processes the launcher started, without starting a process group."""
    env, launcher = os.environ, detect_launcher()
    if launcher == "env":
        return int(env["WORLD_SIZE"])
    if launcher == "slurm":
        return int(env["SLURM_NTASKS"])
    if launcher == "mpi":
        for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
            if var in env:
                return int(env[var])
        from mpi4py import MPI  # PMIx-only launchers: ask MPI itself

        return MPI.COMM_WORLD.Get_size()
    return 1


def rank_from_env() -> int:
    """This process's global rank as the launcher set it, without starting a process group."""
    env, launcher = os.environ, detect_launcher()
    if launcher == "env":
        return int(env["RANK"])
    if launcher == "slurm":
        return int(env["SLURM_PROCID"])
    if launcher == "mpi":
        return int(next(env[v] for v in _MPI_RANK_VARS if v in env))
    return 0


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``"jwb[0001-0003,0007],login1"``.

    Written here so that start-up needs no ``scontrol`` on the compute node.
    """
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def _export_slurm_env(default_port: int) -> None:
    env = os.environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    env.setdefault("MASTER_ADDR", expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
    env.setdefault("MASTER_PORT", str(default_port))
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")


def _export_single_env(default_port: int) -> None:
    env = os.environ
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        with socket.socket() as s:  # a free port, so that two single-process runs never collide
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])


@dataclass
class ParallelDims:
    """Where this process sits: global and local rank, node, and the pipe x tensor x data grid."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: int  # index of this node, in order of first appearance of its host name
    num_nodes: int
    hostname: str
    pipe: int
    tensor: int
    data: int
    data_rank: int
    grid: object  # deepspeed.runtime.pipe.topology.PipelineParallelGrid
    launcher: Launcher
    device: torch.device
    node_of_rank: list[int]  # node index of every global rank
    node_hosts: list[str]  # host name of every node index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.grid.get_stage_id()

    @property
    def tensor_rank(self) -> int:
        """This rank's index in its tensor-parallel group."""
        return self.grid.get_slice_parallel_rank()

    def data_group(self):
        return self.grid.get_data_parallel_group()

    def tensor_group(self):
        return self.grid.get_slice_parallel_group()

    def model_group(self):
        """All ranks that hold one copy of the model between them (pipe x tensor)."""
        return self.grid.get_model_parallel_group()


def init_distributed(pipe: int = 1, tensor: int = 1, timeout_s: float = 600.0,
                     default_port: int = 29500) -> ParallelDims:
    """Start the process group for whichever launcher started us and build the grid.

    Args:
        pipe: pipeline stages.
        tensor: tensor-parallel degree; data = world / (pipe * tensor).
        timeout_s: process-group timeout for collectives.
        default_port: MASTER_PORT where the launcher sets none (SLURM, single process).

    Returns:
        ParallelDims for this process.
    """
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    launcher = detect_launcher()
    if launcher == "slurm":
        _export_slurm_env(default_port)
    elif launcher == "single":
        _export_single_env(default_port)
    # For "mpi", DeepSpeed's MPI discovery (mpi4py) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*.
    accel = get_accelerator()
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=default_port, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # known only now under mpirun (MPI discovery)
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)  # before the first collective creates NCCL communicators
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")

    # Nodes from host names rather than launcher variables: the same answer under every launcher.
    hostname = socket.gethostname()
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, hostname)
    order = list(dict.fromkeys(hosts))
    node_of_rank = [order.index(h) for h in hosts]

    if world % (pipe * tensor):
        raise ValueError(f"world size {world} is not divisible by pipe x tensor = {pipe * tensor}")
    data = world // (pipe * tensor)
    grid = PipelineParallelGrid(topology=PipeModelDataParallelTopology(num_pp=pipe, num_mp=tensor, num_dp=data))
    dims = ParallelDims(rank=rank, world_size=world, local_rank=local_rank,
                        local_world_size=hosts.count(hostname), node=order.index(hostname),
                        num_nodes=len(order), hostname=hostname, pipe=pipe, tensor=tensor, data=data,
                        data_rank=grid.get_data_parallel_rank(), grid=grid, launcher=launcher, device=device,
                        node_of_rank=node_of_rank, node_hosts=order)
    if rank == 0:
        logger.info("started %d processes on %d node(s) via %s (%s backend); layout pipe=%d tensor=%d data=%d",
                    world, len(order), launcher, dist.get_backend(), pipe, tensor, data)
    return dims


def shutdown() -> None:
    """Leave together: a barrier first, so that no rank tears down its process group (and
    its transport threads) while a peer still talks to it, then destroy every group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def configure_cpu_threads(dims: ParallelDims) -> None:
    """On CPU, share the cores among the node's ranks unless OMP_NUM_THREADS says otherwise
    (torch's default of one thread per core in every rank oversubscribes the machine)."""
    if dims.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dims.local_world_size))
