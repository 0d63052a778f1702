#!/usr/bin/env bash
# Training under mpirun (OpenMPI or MPICH); ranks find each other through DeepSpeed's MPI
# discovery (mpi4py), which vitscale corrects to the chosen network interface.
#   NP=8 HOSTS=node1:4,node2:4 IFACE=ib0 launch/mpirun.sh CONFIG [key.sub=value ...]
# NP: processes (default 1). HOSTS: host:slots list (default this machine). IFACE: network
# interface for the rendezvous, NCCL/gloo and MPI's own TCP (becomes parallel.interface).
# MPI: openmpi | mpich (default: what `mpirun --version` says). MASTER_PORT: default 29500.
# Exits with mpirun's exit code.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,9p' "$0"; exit 2; }
mpi=${MPI:-$(mpirun --version 2>&1 | grep -qi "open mpi" && echo openmpi || echo mpich)}
config=$1; shift
[ -z "${IFACE:-}" ] || set -- "parallel.interface=$IFACE" "$@"
if [ "$mpi" = openmpi ]; then  # fill each node in turn; no core binding (loader workers need the cores)
  flags=(-np "${NP:-1}" --map-by slot --bind-to none -x MASTER_PORT="${MASTER_PORT:-29500}" -x PATH -x LD_LIBRARY_PATH)
  [ -z "${HOSTS:-}" ] || flags+=(--host "$HOSTS")
  [ -z "${IFACE:-}" ] || flags+=(--mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE")
else  # MPICH / Hydra (also Intel MPI)
  flags=(-np "${NP:-1}" -genv MASTER_PORT "${MASTER_PORT:-29500}")
  [ -z "${HOSTS:-}" ] || flags+=(-hosts "$HOSTS")
  [ -z "${IFACE:-}" ] || flags+=(-iface "$IFACE")
fi
exec mpirun "${flags[@]}" "${PYTHON:-python}" -m vitscale.train "$config" "$@"
