"""Launcher environments -> rank, world size, local rank, node, master (no process group),
and the choice of network interface.

The deepspeed-launcher, torchrun and MPICH environments were captured on this machine
(`env` of rank 1 under each launcher, launcher variables only) and moved to a second
node where the launcher's own arithmetic says what a second node gets; SLURM and
OpenMPI are written from their documentation (srun(1) OUTPUT ENVIRONMENT VARIABLES,
OpenMPI's mpirun(1) "Environment variables").
"""
import pytest

from vitscale.distributed import LaunchEnv, choose_interface, interface_addresses, launch_env

# 2 nodes x 2 processes, each environment is global rank 3 (node 1, local rank 1).
CAPTURED = {
    "deepspeed": ({"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "4"},
                  LaunchEnv("env", 3, 4, 1, 2, 1, 2, "10.0.0.1", 29500)),
    "torchrun": ({"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29877", "RANK": "3", "ROLE_NAME": "default",
                  "ROLE_RANK": "3", "ROLE_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4"},
                 LaunchEnv("env", 3, 4, 1, 2, 1, 2, "10.0.0.1", 29877)),
    "srun": ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4711", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2",
              "SLURM_STEP_NODELIST": "jwb[0007-0008]", "SLURM_JOB_NODELIST": "jwb[0007-0008]",
              "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)"},
             LaunchEnv("slurm", 3, 4, 1, 2, 1, 2, "jwb0007", None)),
    # the JUWELS template sets MASTER_ADDR to the InfiniBand name; uneven tasks per node
    "srun-ib": ({"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
                 "SLURM_STEP_ID": "0", "SLURM_NNODES": "3", "SLURM_STEP_NODELIST": "jwb[0007-0009]",
                 "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "MASTER_ADDR": "jwb0007i", "MASTER_PORT": "29500"},
                LaunchEnv("slurm", 4, 5, 0, 1, 2, 3, "jwb0007i", 29500)),
    "openmpi": ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "OMPI_UNIVERSE_SIZE": "4",
                 "PMIX_RANK": "3"},
                LaunchEnv("mpi", 3, 4, 1, 2, 1, 2, None, None)),
    "mpich": ({"MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "11", "PMI_HOSTNAME": "node2",
               "PMI_RANK": "3", "PMI_SIZE": "4"},
              LaunchEnv("mpi", 3, 4, 1, 2, 1, 2, None, None)),
    "mpirun-with-port": ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                          "MASTER_PORT": "29934"},
                         LaunchEnv("mpi", 0, 2, 0, 2, 0, 1, None, 29934)),
    "single": ({}, LaunchEnv("single", 0, 1, 0, 1, 0, 1, None, None)),
}


@pytest.mark.parametrize("name", list(CAPTURED))
def test_launch_env_from_captured_environments(name):
    env, want = CAPTURED[name]
    assert launch_env(env) == want


def test_sbatch_script_itself_is_not_a_rank():
    # Inside the batch script (no srun step) SLURM_PROCID=0 of SLURM_NTASKS=8: one process, not rank 0 of 8.
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODEID": "0"}).world_size == 1


ADDRESSES = {"lo": "127.0.0.1", "eth0": "192.0.2.2", "ib0": "10.10.0.7", "ib1": "10.11.0.7", "docker0": "172.17.0.1"}


@pytest.mark.parametrize("configured, env, want", [
    (None, {}, None),
    ("ib0", {"NCCL_SOCKET_IFNAME": "eth0"}, ("ib0", "10.10.0.7", "parallel.interface")),  # the config wins
    (None, {"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "eth0"}, ("ib0", "10.10.0.7", "NCCL_SOCKET_IFNAME")),
    (None, {"VITSCALE_IFNAME": "=ib1", "NCCL_SOCKET_IFNAME": "ib"}, ("ib1", "10.11.0.7", "VITSCALE_IFNAME")),
    (None, {"NCCL_SOCKET_IFNAME": "^docker,lo", "GLOO_SOCKET_IFNAME": "eth0"}, ("eth0", "192.0.2.2", "GLOO_SOCKET_IFNAME")),
    (None, {"NCCL_SOCKET_IFNAME": "hsn,ib"}, ("ib0", "10.10.0.7", "NCCL_SOCKET_IFNAME")),  # first prefix that exists
])
def test_interface_choice(configured, env, want):
    assert choose_interface(configured, env, ADDRESSES) == want


def test_unknown_interface_is_a_clear_error():
    with pytest.raises(ValueError, match=r"parallel.interface=ib0 names no network interface with an IPv4 address "
                                         r"on .* \(it has eth0 \(192.0.2.2\), lo \(127.0.0.1\)\); set parallel.interface"):
        choose_interface("ib0", {}, {"lo": "127.0.0.1", "eth0": "192.0.2.2"})


def test_this_hosts_loopback_is_found():
    assert interface_addresses()["lo"] == "127.0.0.1"
    assert choose_interface(None, {"GLOO_SOCKET_IFNAME": "lo"}) == ("lo", "127.0.0.1", "GLOO_SOCKET_IFNAME")


def _usr1_on_one_rank(rank, world):
    import os
    import signal

    import torch

    from vitscale.distributed import StopRequest

    request = StopRequest()
    assert not request.agreed(torch.device("cpu"))
    if rank == 1:  # SLURM signals every task, but not at the same instant: one rank is enough
        os.kill(os.getpid(), signal.SIGUSR1)
    assert request.agreed(torch.device("cpu")), f"rank {rank} did not learn of the signal"


@pytest.mark.distributed
def test_usr1_on_one_rank_stops_every_rank():
    from tests.conftest import run_in_gloo

    run_in_gloo(_usr1_on_one_rank, 2)
