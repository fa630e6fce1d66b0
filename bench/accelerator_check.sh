#!/usr/bin/env bash
# One-shot accelerator check (bench/accelerator_check.py): f32/bf16 logits parity vs torch, the VL-Eraser
# stage-1 step (time, XLA FLOPs, MFU) and generation at 1B with cuDNN attention on a GPU; the tiny size on a
# CPU, with what needs a GPU marked skipped. Writes $OUT/accelerator_check.json (OUT defaults to .).
# Usage (from the repository root): bash bench/accelerator_check.sh [--size 1b] [--steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
exec timeout "${CHECK_TIMEOUT_S:-480}" "$PY" -m bench.accelerator_check --out "${OUT:-.}/accelerator_check.json" "$@"
