#!/usr/bin/env bash
# One prepared GPU check, for a machine with a GPU and torch already installed (no network needed):
# builds the extension for this card, runs the CUDA tests and compute-sanitizer, `sdcore validate` on the ops
# and on the SD 1.5 model, the op and pipeline benchmarks and `sdcore profile`, writing to OUTDIR (8 files:
# device.txt build.log tests.log validate.txt bench.txt pipeline.json prof/summary.json prof/hotspots.png), and
# on an sm_90 card the Hopper (wgmma) attention kernel: the harness's layout tests (hopper/: verdicts, raw
# dumps, timings), then the attention tests, validate, memcheck, racecheck and the attention bench with
# SDCORE_CUDA_ATTENTION=sm90, and where those tests pass the pipeline bench with it (pipeline_sm90.json).
# Estimated at 7-8 minutes on an H100/H200 (the Hopper steps have not run on a card yet); files written before
# a timeout stay in OUTDIR.
#   bench/gpu_check.sh OUTDIR
# Before the device call, run bench/gpu_wheels.sh here (it fills .whl/ with diffusers, which the GPU image
# lacks) and name .whl in the call's carry; without it the pipeline bench has no diffusers row.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
hopper_ok=0
step() { echo "== $1 ($(date +%T))"; }

# diffusers (the baseline of bench/pipeline.py) is not on the GPU machines: wheels carried in .whl/ if present.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import diffusers" 2>/dev/null \
  || echo "WARNING: no diffusers here (bench/gpu_wheels.sh, then carry .whl): the pipeline bench has no diffusers row"

step "device"
nvidia-smi | tee "$OUT/device.txt"
cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# Only this card's arch: a build for every arch would eat the time budget. Hopper builds 9.0a, the
# arch-specific target that has wgmma (the sm90 attention kernel).
arch=$cap; [ "$cap" = "9.0" ] && arch=9.0a
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step "build (archs $TORCH_CUDA_ARCH_LIST)"
if ! SDCORE_CUDA=1 timeout 270 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -i "spill\|warning" "$OUT/build.log" | grep -v "^$" | head -20
$PY -m sdcore info | tee -a "$OUT/device.txt"

step "CUDA tests"
timeout 180 $PY -m pytest -q -rfE --maxfail=30 tests -k cuda -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30; tail -3 "$OUT/tests.log"

step "compute-sanitizer memcheck"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 $PY bench/sanitize_ops.py >> "$OUT/tests.log" 2>&1 \
  || status=1
tail -4 "$OUT/tests.log"

step "validate: ops, then the SD 1.5 model (fp16, 512x512)"
timeout 60 $PY -m sdcore validate --device cuda > "$OUT/validate.txt" 2>&1 || status=1
timeout 90 $PY -m sdcore validate --arch sd15 --device cuda --dtype fp16 --size 512x512 --steps 4 \
  >> "$OUT/validate.txt" 2>&1 || status=1
tail -8 "$OUT/validate.txt"

step "bench ops fp16"
timeout 90 $PY bench/ops.py --device cuda --dtype fp16 | tee "$OUT/bench.txt" || status=1

step "hopper wgmma attention harness (sm_90 only; bench/hopper/wgmma_attention.cu)"
if [ "$cap" = "9.0" ]; then
  mkdir -p "$OUT/hopper"
  nvcc_bin=$($PY -c "import sys; sys.path.insert(0, 'tools'); from cuda_env import find_cuda_home as f; print(f() or '')")/bin/nvcc
  if timeout 120 "$nvcc_bin" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
      bench/hopper/wgmma_attention.cu csrc/cuda/device_info.cpp csrc/cuda/tensor_map.cpp -o /tmp/wgmma_attention > "$OUT/hopper/build.log" 2>&1; then
    timeout 120 /tmp/wgmma_attention "$OUT/hopper" | tee "$OUT/hopper/result.txt"
  else
    tail -20 "$OUT/hopper/build.log"; echo "hopper harness: build failed"
  fi
  step "the sm90 attention kernel in sdcore (SDCORE_CUDA_ATTENTION=sm90): tests, validate, memcheck, racecheck, bench"
  SDCORE_CUDA_ATTENTION=sm90 timeout 150 $PY -m pytest -q -rfE --maxfail=20 tests/test_attention.py -k cuda \
    -p no:cacheprovider > "$OUT/hopper/tests.log" 2>&1 && hopper_ok=1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/hopper/tests.log" | head -20; tail -3 "$OUT/hopper/tests.log"
  SDCORE_CUDA_ATTENTION=sm90 timeout 60 $PY -m sdcore validate --device cuda > "$OUT/hopper/validate.txt" 2>&1 \
    || status=1
  tail -3 "$OUT/hopper/validate.txt"
  for tool in memcheck racecheck; do
    SDCORE_CUDA_ATTENTION=sm90 timeout 90 compute-sanitizer --tool $tool --error-exitcode 3 \
      $PY bench/sanitize_ops.py --attention-only > "$OUT/hopper/$tool.log" 2>&1 || status=1
    tail -3 "$OUT/hopper/$tool.log"
  done
  echo "# attention with SDCORE_CUDA_ATTENTION=sm90 (the wgmma kernel where it applies; same shapes as above)" \
    | tee -a "$OUT/bench.txt"
  SDCORE_CUDA_ATTENTION=sm90 timeout 60 $PY bench/ops.py --device cuda --dtype fp16 --ops attention \
    | tee -a "$OUT/bench.txt" || status=1
else
  echo "not an sm_90 card ($cap): skipped"
fi

step "bench pipeline (SD1.5 fp16 512x512: kernels eager and with CUDA graphs, torch, diffusers)"
timeout 240 $PY bench/pipeline.py --device cuda --dtype fp16 --sizes 512 --steps 10 --repeat 10 \
  --impls kernels,graphs,torch,diffusers --json "$OUT/pipeline.json" | tee -a "$OUT/bench.txt" || status=1

if [ "$hopper_ok" = 1 ]; then
  step "bench pipeline with the sm90 attention (its tests passed above)"
  echo "# SDCORE_CUDA_ATTENTION=sm90" | tee -a "$OUT/bench.txt"
  SDCORE_CUDA_ATTENTION=sm90 timeout 120 $PY bench/pipeline.py --device cuda --dtype fp16 --sizes 512 --steps 10 \
    --repeat 5 --impls kernels,graphs --json "$OUT/pipeline_sm90.json" | tee -a "$OUT/bench.txt" || status=1
fi

step "profile (SD1.5 fp16 512x512, kernels vs torch)"
# The traces are too large to bring back from a lent machine; summary.json and the chart come back.
timeout 150 $PY -m sdcore profile --arch sd15 --device cuda --dtype fp16 --size 512x512 --steps 5 \
  --compare kernels,torch --out /tmp/sdcore_prof > "$OUT/prof.log" 2>&1 || status=1
mkdir -p "$OUT/prof" && cp /tmp/sdcore_prof/summary.json /tmp/sdcore_prof/hotspots.png "$OUT/prof/" 2>/dev/null
cat "$OUT/prof.log" >> "$OUT/bench.txt" && rm "$OUT/prof.log"
grep -A8 "^component" "$OUT/bench.txt" | tail -9

step "copy bandwidth"
$PY - <<'PY' | tee -a "$OUT/device.txt"
import torch
x = torch.empty(1 << 28, dtype=torch.float16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize(); s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
ms = s.elapsed_time(e) / 20
print(f"device copy: {2 * x.numel() * 2 / ms / 1e6:.0f} GB/s (read + write, 512 MiB buffers)")
PY
step "done (status $status)"
exit $status
