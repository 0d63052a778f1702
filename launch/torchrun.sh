#!/usr/bin/env bash
# torchrun, started once per node (by hand, pdsh, or `srun --ntasks-per-node=1`).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh CONFIG [key.sub=value ...]
# NPROC_PER_NODE: default every GPU of the node (1 without GPUs). NNODES / NODE_RANK: default
# 1 / 0 (SLURM_NNODES / SLURM_NODEID under srun). MASTER_ADDR / MASTER_PORT: default
# 127.0.0.1 / 29500. Exits with torchrun's exit code.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
nproc=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
exec torchrun --nnodes "${NNODES:-${SLURM_NNODES:-1}}" --node_rank "${NODE_RANK:-${SLURM_NODEID:-0}}" \
  --nproc_per_node "$nproc" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m vitscale.train "$@"
