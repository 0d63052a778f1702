"""How each launcher starts a job on the rehearsal cluster, as it would on a real one.

- ``torchrun``: once per node, ``--nnodes N --node_rank I --nproc_per_node K`` with the first
  node's host name as the rendezvous address (``launch/torchrun.sh``).
- ``mpirun``: MPICH's Hydra started on node0 with ``-hosts node0:K,... -iface IFACE``
  (``launch/mpirun.sh``); Hydra reaches the other nodes through its ssh launcher, whose
  executable (``HYDRA_LAUNCHER_EXEC``) is our ``enter.py`` shim instead of ssh. Under Open MPI
  the shim is ``OMPI_MCA_plm_rsh_agent`` (not exercised here: the machine has MPICH).
- ``deepspeed``: the deepspeed launcher on node0 over a hostfile of the nodes, through its
  MPICH runner (``--launcher mpich``; the pdsh runner needs pdsh and sshd), so the remote starts
  go through Hydra and the shim as above.
- ``srun-style``: what ``srun`` does under ``launch/slurm/*.sbatch``: K tasks per node, each
  with SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURM_NTASKS / SLURM_JOB_NODELIST, and
  MASTER_ADDR the first host of the node list as the sbatch scripts set it.

A ``Start`` is one process the rehearsal starts on one node (through ``enter.py``); the
processes a launcher starts on other nodes are not ``Start``s: the node's cgroup finds them.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vitscale.rehearsal.enter import HOSTS_ENV

LAUNCHERS = ("torchrun", "mpirun", "deepspeed", "srun-style")
MASTER_PORT = 29500  # every rehearsal has namespaces of its own: no port is shared with anything

# Variables a launcher sets for its processes: never inherited from the shell that runs the
# rehearsal (which may itself sit in a SLURM allocation or an mpirun), nor the test hook that
# fakes host names.
_LAUNCH_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "HYDRA_", "TORCHELASTIC_")
_LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "VITSCALE_HOSTNAME", "VITSCALE_IFNAME",
                "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"}


@dataclass
class Start:
    node: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""


def base_env(hosts_file: Path, shim: Path, threads: int) -> dict[str, str]:
    """The environment every node process starts from."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env.update({HOSTS_ENV: str(hosts_file), "PYTHONUNBUFFERED": "1",
                "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(shim), "OMPI_MCA_plm_rsh_agent": str(shim)})
    env.setdefault("OMP_NUM_THREADS", str(threads))  # each node its share of the machine's cores
    return env


def write_shim(state_dir: Path) -> Path:
    """An executable that runs ``enter.py`` with this Python (a launcher's ``ssh``)."""
    shim = state_dir / "ssh-to-node"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m vitscale.rehearsal.enter \"$@\"\n")
    shim.chmod(0o755)
    return shim


def starts(launcher: str, hosts: list[str], per_node: int, job: list[str], state_dir: Path,
           iface: str) -> list[Start]:
    """The processes to start for ``launcher`` (``job``: the module and its arguments,
    ``["-m", "vitscale.train", CONFIG, overrides...]``)."""
    py, nodes, world = sys.executable, len(hosts), len(hosts) * per_node
    master = hosts[0]
    if launcher == "torchrun":
        return [Start(i, [py, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(i),
                          "--nproc_per_node", str(per_node), "--master_addr", master, "--master_port",
                          str(MASTER_PORT), *job], label="torchrun") for i in range(nodes)]
    if launcher == "mpirun":
        mpirun = Path(py).parent / "mpirun"
        return [Start(0, [str(mpirun if mpirun.exists() else "mpirun"), "-np", str(world), "-genv", "MASTER_PORT",
                          str(MASTER_PORT), "-hosts", ",".join(f"{h}:{per_node}" for h in hosts), "-iface", iface,
                          py, *job], label="mpirun")]
    if launcher == "deepspeed":
        hostfile = state_dir / "hostfile"
        hostfile.write_text("".join(f"{h} slots={per_node}\n" for h in hosts))
        runner = Path(py).parent / "deepspeed"
        # The job as a script path, not --module: DeepSpeed's MPICH runner (0.19) puts python's -m in
        # front of its own helper's file path when --module is given, and the start fails.
        script = job
        if job[:1] == ["-m"]:
            spec = importlib.util.find_spec(job[1])
            script = [str(Path(spec.submodule_search_locations[0]) / "__main__.py") if spec.submodule_search_locations
                      else spec.origin, *job[2:]]
        return [Start(0, [str(runner if runner.exists() else "deepspeed"), "--hostfile", str(hostfile), "--launcher",
                          "mpich", "--no_ssh_check", "--master_addr", master, "--master_port", str(MASTER_PORT),
                          *script], label="deepspeed")]
    if launcher == "srun-style":
        nodelist = f"node[0-{nodes - 1}]" if nodes > 1 else hosts[0]
        out = []
        for i in range(nodes):
            for j in range(per_node):
                env = {"SLURM_PROCID": str(i * per_node + j), "SLURM_LOCALID": str(j), "SLURM_NODEID": str(i),
                       "SLURM_NTASKS": str(world), "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
                       "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
                       "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_STEP_TASKS_PER_NODE":
                       f"{per_node}(x{nodes})", "SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0",
                       "SLURM_CPUS_PER_TASK": "1", "MASTER_ADDR": master, "MASTER_PORT": str(MASTER_PORT)}
                out.append(Start(i, [py, "-u", *job], env, label=f"task {i * per_node + j}"))
        return out
    raise ValueError(f"--launcher {launcher}: choose one of {', '.join(LAUNCHERS)}")
