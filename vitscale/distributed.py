"""Process-group start from any launcher, and the pipe x tensor x data topology.

The only module that reads launcher environment variables. Supported launchers:

- ``deepspeed`` and ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are set.
- SLURM ``srun`` (one task per device): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID,
  master = first host of the step's node list (MASTER_ADDR/MASTER_PORT override).
- ``mpirun`` (OpenMPI, MPICH/Hydra, Intel MPI): DeepSpeed's MPI discovery through
  mpi4py fills RANK etc. in ``deepspeed.init_distributed``.
- nothing: a single process.

``launch_env`` reads rank, world size, local rank, node index and master address from
the environment alone (tests feed it captured environments); the node index used at
run time comes from an all-gather of host names, the same under every launcher.

The network: DeepSpeed's MPI discovery takes the first address of ``hostname -I`` as
the master's, which on an InfiniBand machine is often the Ethernet one. Where
``parallel.interface`` or ``VITSCALE_IFNAME`` / ``NCCL_SOCKET_IFNAME`` /
``GLOO_SOCKET_IFNAME`` name an interface (``ib0``, or a prefix ``ib``), start-up uses
its address as the master's under mpirun, hands the name to NCCL and gloo, and logs
the choice on each node. ``VITSCALE_HOSTNAME`` replaces the host name a process
reports (containers whose nodes share one host name; tests posing as several nodes).

The grid is DeepSpeed's own ``PipelineParallelGrid`` over a
``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``, so DeepSpeed and our
parallel layers share one set of process groups.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

if TYPE_CHECKING:
    import torch

# No module-level torch import: tools that only need the launcher's ranks (vitscale-synth)
# import this module without paying for torch.

logger = logging.getLogger(__name__)

Launcher = Literal["env", "slurm", "mpi", "single"]

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
# OpenMPI, MPICH/Hydra (and Intel MPI), PMIx
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK")
_MPI_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE")
_IFNAME_VARS = ("VITSCALE_IFNAME", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


def detect_launcher(env: Mapping[str, str] | None = None) -> Launcher:
    """Which launcher started this process (decided from the environment only)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if any(v in env for v in _MPI_RANK_VARS):
        return "mpi"
    # Inside an sbatch script but outside srun, SLURM_PROCID is 0 of SLURM_NTASKS too:
    # only a job step (SLURM_STEP_ID) is a set of ranks.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "single"


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher's environment says about this process, before any process group.

    ``local_world_size``, ``node`` and ``num_nodes`` are None where the launcher does not
    tell; ``master_addr`` is None under mpirun (MPI discovery finds it at start-up).
    """

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    node: int | None
    num_nodes: int | None
    master_addr: str | None
    master_port: int | None


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    return next((int(env[n]) for n in names if env.get(n, "") != ""), None)


def _slurm_tasks_on_node(spec: str, node: int) -> int | None:
    """``SLURM_STEP_TASKS_PER_NODE`` such as ``"4(x2),3"`` -> tasks on node ``node``."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node] if node < len(counts) else None


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank, node and master address from a launcher's environment.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        A LaunchEnv. Under mpirun the node index assumes ranks placed by slot (node after
        node), the default of OpenMPI and MPICH; start-up checks it against host names.
    """
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    port = _first(env, ("MASTER_PORT",))
    master = env.get("MASTER_ADDR") or None
    if launcher == "env":  # torchrun: LOCAL_WORLD_SIZE, GROUP_*; deepspeed launcher: LOCAL_SIZE, CROSS_*
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_world = _first(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
        node, nodes = _first(env, ("GROUP_RANK", "CROSS_RANK")), _first(env, ("GROUP_WORLD_SIZE", "CROSS_SIZE"))
        local_rank = _first(env, ("LOCAL_RANK",)) or 0
    elif launcher == "slurm":
        rank, world, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _first(env, ("SLURM_LOCALID",)) or 0
        node = _first(env, ("SLURM_NODEID",))
        nodes = _first(env, ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = _slurm_tasks_on_node(spec, node or 0) if spec else None
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        master = master or (expand_nodelist(nodelist)[0] if nodelist else None)
    elif launcher == "mpi":
        rank, world = _first(env, _MPI_RANK_VARS), _first(env, _MPI_SIZE_VARS)
        if world is None:
            from mpi4py import MPI  # PMIx-only launchers: ask MPI itself

            world = MPI.COMM_WORLD.Get_size()
        local_rank = _first(env, _MPI_LOCAL_RANK_VARS) or 0
        local_world = _first(env, _MPI_LOCAL_SIZE_VARS)
        node = rank // local_world if local_world else None
        nodes = -(-world // local_world) if local_world else None
    else:
        rank, world, local_rank, local_world, node, nodes = 0, 1, 0, 1, 0, 1
    if launcher == "env" and local_world and node is None:
        node, nodes = rank // local_world, -(-world // local_world)
    return LaunchEnv(launcher, rank, world, local_rank, local_world, node, nodes, master, port)


def world_size_from_env() -> int:
    """Number of processes the launcher started, without starting a process group."""
    return launch_env().world_size


def rank_from_env() -> int:
    """This process's global rank as the launcher set it, without starting a process group."""
    return launch_env().rank


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
    found, env = launch_env(), os.environ
    env.setdefault("MASTER_ADDR", found.master_addr or "127.0.0.1")
    env.setdefault("MASTER_PORT", str(default_port))
    env.update(RANK=str(found.rank), WORLD_SIZE=str(found.world_size), LOCAL_RANK=str(found.local_rank))


def _mpi_discovery(default_port: int, address: str | None) -> None:
    """DeepSpeed's MPI discovery (mpi4py), then our corrections: the master's address on the
    chosen interface rather than ``hostname -I``'s first, and the launcher's MASTER_PORT
    (discovery overwrites it with the default, so two runs on one machine would collide)."""
    from deepspeed.comm.comm import mpi_discovery
    from mpi4py import MPI

    port = os.environ.get("MASTER_PORT")
    mpi_discovery(distributed_port=int(port) if port else default_port, verbose=False)
    if address is not None:
        os.environ["MASTER_ADDR"] = MPI.COMM_WORLD.bcast(address, root=0)


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every network interface of this host: ``{"ib0": "10.1.2.3", ...}``."""
    import psutil  # a DeepSpeed dependency

    return {name: a.address for name, addrs in psutil.net_if_addrs().items()
            for a in addrs if a.family == socket.AF_INET}


def choose_interface(configured: str | None = None, env: Mapping[str, str] | None = None,
                     addresses: dict[str, str] | None = None) -> tuple[str, str, str] | None:
    """The network interface for rendezvous and collectives, or None for the launcher's default.

    Args:
        configured: ``parallel.interface`` (wins over the environment).
        env: read for VITSCALE_IFNAME, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, in this order.
            NCCL's syntax: a comma-separated list of prefixes (``ib``), ``=ib0`` for an exact
            name; an exclusion list (``^docker``) names no interface and is skipped.
        addresses: ``interface_addresses()`` (default: this host's).

    Returns:
        (interface, its IPv4 address, where the choice came from), or None.
    """
    env = os.environ if env is None else env
    sources = [("parallel.interface", configured)] + [(v, env.get(v)) for v in _IFNAME_VARS]
    source, spec = next(((k, v) for k, v in sources if v and not v.startswith("^")), (None, None))
    if spec is None:
        return None
    addresses = interface_addresses() if addresses is None else addresses
    for wanted in spec.split(","):
        exact = wanted.startswith("=")
        wanted = wanted.lstrip("=")
        for name in sorted(addresses, key=lambda n: (n != wanted, n)):  # an exact match before a prefix one
            if name == wanted or (not exact and name.startswith(wanted)):
                return name, addresses[name], source
    have = ", ".join(f"{n} ({a})" for n, a in sorted(addresses.items())) or "none"
    raise ValueError(f"{source}={spec} names no network interface with an IPv4 address on {socket.gethostname()} "
                     f"(it has {have}); set {source} to one of them, or unset it for the launcher's default")


def _use_interface(configured: str | None) -> tuple[str, str, str] | None:
    """Pick the interface and hand it to NCCL and gloo (read when their groups start)."""
    choice = choose_interface(configured)
    if choice is not None:
        for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            if configured or var not in os.environ:  # an explicit parallel.interface wins
                os.environ[var] = choice[0]
    return choice


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Variables a single-process start put into os.environ (for DeepSpeed's env:// start), with what they held
# before: shutdown() restores them, so a later start in the same process, or a child process, sees no stale
# rank or port (a leaked MASTER_PORT made later single-process starts collide on it).
_EXPORTED: dict[str, str | None] = {}


def _export_single_env(default_port: int) -> None:
    values = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                  MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))  # two runs never collide
    for key, value in values.items():
        _EXPORTED.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _restore_env() -> None:
    for key, value in _EXPORTED.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _EXPORTED.clear()


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
                     default_port: int = 29500, interface: str | None = None) -> ParallelDims:
    """Start the process group for whichever launcher started us and build the grid.

    Args:
        pipe: pipeline stages.
        tensor: tensor-parallel degree; data = world / (pipe * tensor).
        timeout_s: process-group timeout for collectives.
        default_port: MASTER_PORT where the launcher sets none (SLURM, mpirun, single process).
        interface: network interface (``parallel.interface``); None = from the environment
            (``choose_interface``) or the launcher's default.

    Returns:
        ParallelDims for this process.
    """
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    launcher = detect_launcher()
    network = _use_interface(interface)
    if launcher == "slurm":
        _export_slurm_env(default_port)
    elif launcher == "single":
        _export_single_env(default_port)
    elif launcher == "mpi":  # sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
        _mpi_discovery(default_port, network[1] if network else None)
    accel = get_accelerator()
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=default_port, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    set_new_group_timeout(timedelta(seconds=timeout_s))  # before the grid: its groups, DeepSpeed's later ones
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # known only now under mpirun (MPI discovery)
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)  # before the first collective creates NCCL communicators
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")

    # Nodes from host names rather than launcher variables: the same answer under every launcher.
    hostname = os.environ.get("VITSCALE_HOSTNAME") or socket.gethostname()
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
    if local_rank == 0:
        logger.info("node %d (%s): network interface %s; master %s:%s", dims.node, hostname,
                    f"{network[0]} ({network[1]}) from {network[2]}" if network else
                    "the launcher's default (set parallel.interface or NCCL_SOCKET_IFNAME to choose)",
                    os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return dims


def set_new_group_timeout(timeout: timedelta) -> None:
    """Make every process group created from now on (``new_group`` without a timeout) wait at
    most ``timeout`` in a collective, as the world group does.

    Why a patch, and why here: torch gives a group made by ``new_group(ranks)`` without a
    ``timeout`` the backend's default (gloo 30 minutes, NCCL 10 minutes), not the world group's.
    DeepSpeed makes all its groups that way and has no parameter for a timeout:
    ``PipelineParallelGrid`` (data, tensor = "slice", pipe, model groups and the pipeline's p2p
    groups), ``deepspeed.utils.groups`` and ZeRO's groups made inside ``deepspeed.initialize``,
    every ``deepspeed.comm.new_group``. ``new_group`` reads its default from
    ``distributed_c10d.default_pg_timeout`` (``default_pg_nccl_timeout`` for NCCL) each time it
    is called, so setting both once, right after the world group starts, covers every group of
    the job, ours and DeepSpeed's, including those made later; ``group_timeouts`` reads them
    back (``train/__main__.py`` checks them once the engine is built). The one place vitscale
    touches torch's internals for timeouts."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, timedelta):  # None where torch has no NCCL
        c10d.default_pg_nccl_timeout = timeout


def group_timeouts() -> dict[str, float]:
    """The collective timeout, in seconds, of every process group this process belongs to, each
    backend of a group once (gloo on the CPU, NCCL on the GPU): ``{"group 3 ranks [0, 1] gloo": 300.0}``."""
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    found = {}
    for group in list(c10d._world.pg_map):
        backends = {}
        for part in str(dist.get_backend_config(group)).split(","):
            device, _, name = part.partition(":")
            backend = group._get_backend(torch.device(device))
            backends.setdefault(id(backend), (name, backend))
        for name, backend in backends.values():
            options = getattr(backend, "options", None)
            if options is not None:
                key = f"group {group.group_name} ranks {dist.get_process_group_ranks(group)} {name}"
                found[key] = options._timeout.total_seconds()
    return found


# Exit codes of ``vitscale-train`` (the launch scripts pass them on). 0: done, or stopped on
# SIGUSR1 with a checkpoint written (SLURM's ``--signal=USR1@120``: the time limit is near);
# 2: config error; 3: numeric fault (train.max_bad_steps bad steps in a row);
# 75 (EX_TEMPFAIL, "try again"): a rank was lost or stopped progressing (watchdog.py), resubmit to resume;
# 143 (128 + SIGTERM): stopped on SIGTERM with a checkpoint written.
EXIT_CONFIG, EXIT_NUMERIC, EXIT_LOST_RANK, EXIT_TERMINATED = 2, 3, 75, 143


class StopRequest:
    """A signal that asks the run to checkpoint and stop: SIGUSR1 (SLURM's
    ``--signal=USR1@120``; Python's default would end the process at once) and SIGTERM
    (SLURM at the time limit, ``scancel``, a preemption; SLURM kills 30 s later).

    Create it before any DataLoader worker starts: forked workers inherit the handler, so
    a SIGTERM sent to the whole process tree (SLURM, the deepspeed launcher) does not kill
    them under the step that still needs their batches.

    ``poll`` and ``agreed`` are collective: every rank learns at the same step whether any
    rank got a signal (one tiny all-reduce), so all of them save the same checkpoint and
    stop together; ``poll`` also leaves in ``age_s`` how long before it the first signal
    arrived on any rank (the time the signal's lead has already used).
    """

    def __init__(self, signums: tuple[int, ...] | None = None):
        import signal

        self.signum = 0  # the first signal received, 0 = none
        self.received_at = 0.0  # time.monotonic() when it arrived
        self.age_s = 0.0  # set by poll: seconds from the earliest arrival on any rank to the poll
        for signum in (signal.SIGUSR1, signal.SIGTERM) if signums is None else signums:
            signal.signal(signum, self._set)

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _set(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self.received_at = signum, time.monotonic()

    def poll(self, device: torch.device, *flags) -> tuple:
        """Collective: (the largest signal number any rank received, 0 if none; then for each of
        ``flags`` whether any rank reports it, e.g. a non-finite loss), in one all-reduce."""
        return self.start_poll(device, *flags).result()

    def start_poll(self, device: torch.device, *flags) -> "PendingPoll":
        """Collective: ``poll`` started, its answer read later (``PendingPoll.result``), so that a
        GPU's queue need not drain for it: the flags may be host bools or device tensors (a
        non-finite loss found on the device), the all-reduce runs in stream order and its answer
        is copied into pinned host memory behind an event."""
        import torch
        import torch.distributed as dist

        age = time.monotonic() - self.received_at if self.signum else 0.0
        host, on_device, places = [float(self.signum), age], [], []  # places: where each flag sits in the values
        for flag in flags:
            if isinstance(flag, torch.Tensor):
                places.append(-1 - len(on_device))  # after the host values: resolved below
                on_device.append(flag.reshape(()).to(device=device, dtype=torch.float32))
            else:
                places.append(len(host))
                host.append(float(flag))
        places = [p if p >= 0 else len(host) - 1 - p for p in places]
        cuda = device.type == "cuda"
        # A pageable host tensor would be copied with a stream synchronisation; a pinned one is not.
        values = torch.tensor(host, dtype=torch.float32, pin_memory=cuda).to(device, non_blocking=cuda)
        if on_device:
            values = torch.cat([values, torch.stack(on_device)])
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return PendingPoll(self, values, places, cuda)

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank received a stop signal."""
        return self.poll(device)[0] != 0


class PendingPoll:
    """A ``StopRequest.start_poll`` in flight: ``result`` waits for its all-reduce (on a GPU, only
    for the work queued before it) and returns what ``StopRequest.poll`` returns, the flags in the
    order they were given."""

    def __init__(self, request: StopRequest, values, places: list[int], cuda: bool):
        import torch

        self._request, self._places, self._answer = request, places, None
        if cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = values, None

    def result(self) -> tuple:
        if self._answer is None:
            if self._event is not None:
                self._event.synchronize()
            values = self._host.tolist()
            self._request.age_s = values[1]
            self._answer = (int(values[0]), *(bool(values[i]) for i in self._places))
        return self._answer


def shutdown() -> None:
    """Leave together: a barrier first, so that no rank tears down its process group (and
    its transport threads) while a peer still talks to it, then destroy every group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _remove_shm_buffers()
    _restore_env()


def _remove_shm_buffers() -> None:
    """DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) leaves a 67 MB file per rank in
    /dev/shm, named by user, master address and port, and never unlinks it: on a CPU machine
    that runs many jobs they fill the RAM, and a later run on the same port would open a
    stale buffer. Every rank has passed the barrier, so the names can go (mappings stay)."""
    if int(os.environ.get("LOCAL_RANK", 0)) != 0 or not hasattr(os, "getuid"):
        return
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_"
    shm = Path("/dev/shm")
    for path in shm.glob(prefix + "*") if shm.is_dir() else []:
        path.unlink(missing_ok=True)


def configure_cpu_threads(dims: ParallelDims) -> None:
    """On CPU, share the cores among the node's ranks unless OMP_NUM_THREADS says otherwise
    (torch's default of one thread per core in every rank oversubscribes the machine)."""
    if dims.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dims.local_world_size))
