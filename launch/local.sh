#!/usr/bin/env bash
# One host. By default runs the command once, over every local device (all GPUs of the machine, or the
# CPU). NPROC=N starts N processes that join one JAX job through jax.distributed on localhost: a
# rehearsal of a multi-host run (add CPU_DEVICES=K to give each process K simulated CPU devices).
#
#   launch/local.sh vleraser plan --config configs/llava_1_5_7b.py --mesh 1x4x2
#   NPROC=2 CPU_DEVICES=4 launch/local.sh python -m vleraser_jax.parallel --mesh 2x2x2
set -euo pipefail
NPROC=${NPROC:-1}
if [ "$NPROC" -eq 1 ]; then
  exec "$@"
fi
PORT=${PORT:-$((20000 + RANDOM % 20000))}
cpu=()
if [ -n "${CPU_DEVICES:-}" ]; then
  cpu=(JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES")
fi
pids=()
for ((i = 0; i < NPROC; i++)); do
  env VLERASER_DISTRIBUTED=1 VLERASER_COORDINATOR="127.0.0.1:$PORT" VLERASER_NUM_PROCESSES="$NPROC" \
      VLERASER_PROCESS_ID="$i" "${cpu[@]}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
