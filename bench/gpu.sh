#!/usr/bin/env bash
# GPU throughput on a CUDA machine: model only vs the full pipeline, ViT-B/32 @ 224 and ViT-B/16 @ 448
# (CONCH's shape), bf16, a few batch sizes, random weights. About 4-6 minutes; prints a table and writes
# gpu.json to $OUT (if set) and bench/results/.
#
# The machine needs torch, torchvision, numpy, scipy, opencv, Pillow, tifffile and tqdm (a CUDA image
# usually has them). What it lacks travels as wheels in .whl/ (git-ignored), fetched once beside the repo:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth tiffslide==3.0.1 zarr==3.1.6 donfig \
#     google-crc32c numcodecs==0.16.6 imagecodecs==2026.3.6
#
# (about 37 MB). Then: bash bench/gpu.sh [extra arguments for bench/gpu_throughput.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zeus-site .whl/*.whl
  export PYTHONPATH="/tmp/zeus-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the engine from this source tree
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 470 "$PY" bench/gpu_throughput.py "$@"
