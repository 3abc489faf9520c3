#!/usr/bin/env bash
# Launch `llava train` on the GPUs of this node (and, with NNODES > 1, of several nodes) with torchrun.
# Everything after the script name is passed to `llava train` as Hydra overrides; no hyperparameters here.
#
#   launch/torchrun.sh deepspeed=none model=llava-v1.6-mistral-7b data.train_path=...    # one node, DDP
#   launch/torchrun.sh deepspeed=zero3 ...                                               # one node, ZeRO-3
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a launch/torchrun.sh deepspeed=zero3 ...       # on node-a
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-a launch/torchrun.sh deepspeed=zero3 ...       # on node-b
#
# Environment: NPROC_PER_NODE (default: number of GPUs, or 1), NNODES (1), NODE_RANK (SLURM_NODEID or 0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python).
set -euo pipefail

if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    NPROC_PER_NODE=1
  fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  -m llava_train train "$@"
