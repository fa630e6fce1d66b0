#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker VM at once. Each worker runs one process over
# its local chips; jax.distributed.initialize() (called by `vleraser` when VLERASER_DISTRIBUTED=1) finds
# the other workers through the TPU metadata, so no addresses are passed.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh \
#       vleraser unlearn --config configs/llava_1_5_7b.py --config.model.attention=xla --config.mesh.fsdp=16
#
# Expects this repository with its .venv at $REPO on every worker (same path; e.g. cloned by a startup
# script) and the checkpoint / data paths of the config readable on every worker.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-'~/vleraser_jax'}
CMD=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $REPO && source .venv/bin/activate && VLERASER_DISTRIBUTED=1 $CMD"
