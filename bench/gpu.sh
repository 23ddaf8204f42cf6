#!/usr/bin/env bash
# GPU throughput and precision on a CUDA machine, as one prepared script (about 8-9 minutes in all):
#
# 1. bench/gpu_throughput.py: model only, preprocess + model, and the full pipeline (patches/s, fed %, peak
#    GPU memory) for KEEP's shape (ViT-L/16 @ 224 with its BERT text tower, both loaded once; timm's fused
#    attention) in fp32, TF32 and bf16, then ViT-B/32 @ 224 and ViT-B/16 @ 448 (CONCH's shape) in bf16.
#    Random weights: the cost of a model depends on its shape, not its weights. (~5 minutes, --budget 300)
# 2. bench/precision.py: score drift, argmax flips and mask Dice of TF32, bf16 and fp16 against fp32 on the
#    demo slide, for the tiny trained model and KEEP's network (random weights). (~2-3 minutes)
#
# Prints tables and writes gpu.json and precision.json to $OUT (if set) and bench/results/.
# On a machine without CUDA, `bash bench/gpu.sh --dry-run` checks every code path on the CPU (small slide,
# a 2-block KEEP; no measurement, about 5-8 minutes on 2 cores).
#
# The machine needs torch, torchvision, numpy, scipy, opencv, Pillow, tifffile and tqdm (a CUDA image
# usually has them). What it lacks travels as wheels in .whl/ (git-ignored), fetched once beside the repo:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth tiffslide==3.0.1 zarr==3.1.6 donfig \
#     google-crc32c numcodecs==0.16.6 imagecodecs==2026.3.6 timm transformers tokenizers safetensors \
#     huggingface_hub regex
#
# (KEEP's shape needs timm and transformers: pin the versions this project's environment has, and match the
# machine's Python with --python-version.)
# Then: bash bench/gpu.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zeus-site .whl/*.whl
  export PYTHONPATH="/tmp/zeus-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the engine from this source tree
export PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--dry-run" ]]; then
  timeout 900 "$PY" bench/gpu_throughput.py --dry-run --budget 600 --work-dir /tmp/zeus-gpu-bench-dry
  exec timeout 600 "$PY" bench/precision.py --device cpu --models tiny keep --keep-depth 2 --size 1536 1536 \
    --precisions tf32 bf16 --work-dir /tmp/zeus-precision-dry
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 330 "$PY" bench/gpu_throughput.py --budget 300 --batch-sizes 128 256 512 --pipeline-batch-sizes 256 "$@" || \
  echo "gpu_throughput.py ended early (exit $?); its table so far is above"
exec timeout 200 "$PY" bench/precision.py --models tiny keep vit-b16-448 --precisions tf32 bf16 fp16
