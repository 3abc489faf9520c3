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

# Preemption (SLURM, `docker stop`, a kill of this process group): the ranks, not torchrun's agent, get the
# signal. The agent runs in a session of its own (setsid) so a signal to this group does not reach it (it would
# stop the ranks and exit 1); this script passes SIGTERM/SIGUSR1 on to the ranks, which save a checkpoint at
# the end of the step and exit 0 (llava_train/train/resume.py), and the agent then exits 0 too.
setsid "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  -m llava_train train "$@" &
agent=$!
# shellcheck disable=SC2329  # called by the traps below
forward() {
  pkill "-$1" -P "$agent" 2>/dev/null || kill "-$1" "$agent" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
# `wait` returns early when a trapped signal arrives: wait again until the agent has really exited
while :; do
  status=0
  wait "$agent" || status=$?
  kill -0 "$agent" 2>/dev/null || break
done
exit "$status"
