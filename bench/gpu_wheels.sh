#!/usr/bin/env bash
# Run here, before lending a GPU machine its first command: downloads into .whl/ (ignored by git) the wheels
# bench/gpu_check.sh installs there, for the Python packages its benchmarks need that the GPU image lacks
# (device/KINDS.md lists the image's packages; it has torch, transformers, safetensors, numpy, pillow, scipy,
# peft, hypothesis, matplotlib). Today that is diffusers, the pipeline bench's baseline, and importlib_metadata,
# which diffusers asks for. The image's Python is 3.12; both wheels are pure Python.
# Then call the device tool with carry [".whl"] and the command `bench/gpu_check.sh $OUT`.
#   bench/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
# The same diffusers as the test oracle here, so the GPU bench compares against what the tests trust.
diffusers=$($PY -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || echo "")
exclude=$(git rev-parse --git-path info/exclude)  # .git/info/exclude, also in a worktree
grep -qxF "/.whl/" "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")"; echo "/.whl/" >> "$exclude"; }
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers${diffusers:+==$diffusers}" importlib_metadata
ls -l .whl
du -sh .whl
