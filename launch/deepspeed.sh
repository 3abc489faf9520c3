#!/usr/bin/env bash
# Launch `llava train` with the DeepSpeed launcher: this node's GPUs, or every node of a hostfile
# (lines "host slots=N"; the launcher starts the ranks on the other hosts over passwordless ssh).
# Arguments are Hydra overrides for `llava train`; choose the ZeRO stage with deepspeed=zero2|zero3|zero3_offload.
#
#   launch/deepspeed.sh deepspeed=zero3 model=llava-v1.6-mistral-7b data.train_path=...
#   HOSTFILE=hosts.txt launch/deepspeed.sh deepspeed=zero3 ...
#
# Environment: NUM_GPUS (default: every GPU of each host), HOSTFILE (none: this node only),
# MASTER_ADDR / MASTER_PORT (DeepSpeed's defaults), DEEPSPEED (deepspeed).
set -euo pipefail

DEEPSPEED=${DEEPSPEED:-deepspeed}
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
fi
if [ -n "${NUM_GPUS:-}" ]; then
  args+=(--num_gpus "$NUM_GPUS")
fi
if [ -n "${MASTER_ADDR:-}" ]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
if [ -n "${MASTER_PORT:-}" ]; then
  args+=(--master_port "$MASTER_PORT")
fi

# --no_local_rank: ranks read LOCAL_RANK from the environment (a --local_rank argument is no Hydra override)
exec "$DEEPSPEED" "${args[@]}" --no_local_rank --module llava_train train "$@"
