#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher (ssh/pdsh from this node to every host).
#   launch/deepspeed.sh CONFIG [key.sub=value ...]
#   HOSTFILE=my_hosts MASTER_ADDR=10.10.0.1 launch/deepspeed.sh configs/vit_large_fdsl.yaml parallel.interface=ib0
# HOSTFILE: "HOST slots=N" per line (default launch/hostfile). MASTER_ADDR: the first host's
# address on the fast network; without it deepspeed takes the first of `hostname -I` there,
# often the Ethernet one. MASTER_PORT: default 29500. parallel.interface=ib0 makes every rank
# use that interface for NCCL/gloo (logged at start-up). DS_ARGS: more launcher flags (e.g.
# --no_ssh_check for a hostfile of localhost only). Exits with the launcher's exit code.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
args=(--hostfile "${HOSTFILE:-$(dirname "$0")/hostfile}" --master_port "${MASTER_PORT:-29500}")
[ -z "${MASTER_ADDR:-}" ] || args+=(--master_addr "$MASTER_ADDR")
# shellcheck disable=SC2086  # DS_ARGS is a list of flags
exec deepspeed "${args[@]}" ${DS_ARGS:-} --module vitscale.train "$@"
