#!/usr/bin/env bash
# One prepared single-GPU run: bf16 training MFU of ViT-B/16 and CLIP B/16 at batch 256 and the
# measured bf16 matmul limit (bench/gpu_mfu.py), then a profile of 3 more steps of each (op-class
# times and the slowest ops; traces and compiled HLO in $OUT/profile). Needs jax (with CUDA),
# flax, optax, numpy, what mmjax's trainer imports (ml_collections, orbax-checkpoint) and this
# checkout; a package the machine lacks can be put on PYTHONPATH from carried wheels first. About
# 2 minutes on an H200, compiles included (cut at 300 s).
#
#   bash bench/gpu.sh                          # tables and JSON to $OUT (default bench/gpu_out)
#   OUT=/tmp/x bash bench/gpu.sh --batch 128   # extra arguments go to gpu_mfu.py
#   bash bench/gpu.sh --peak-tflops 312        # another chip: its dense bf16 peak (A100: 312)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# XLA's command buffers (CUDA graphs) put most of a step's kernels into one profiler event
# ("command_buffer_4": 88 of 99 ms), which the profile cannot split into ops; off, each kernel is
# its own event. Step times with and without them were within 2% (H200, 2026-11-30: ViT 98.4 vs
# 99.2 ms, CLIP 117.7 vs 116.5).
export XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}"
python3 -c "import ml_collections, orbax.checkpoint" || {
  echo "bench/gpu.sh: the trainer's step needs ml_collections and orbax-checkpoint" >&2; exit 1; }
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/gpu_env.txt"
timeout 300 python3 bench/gpu_mfu.py --batch 256 --steps 10 --warmup 3 --out "$OUT/gpu_mfu.json" \
  --profile "$OUT/profile" "$@" \
  | tee "$OUT/gpu_mfu.md"
