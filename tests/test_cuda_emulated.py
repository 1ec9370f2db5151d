"""sdcore's CUDA kernels on a host emulator of the CUDA execution model (tests/emu/simt.h), with g++ and no GPU:
the kernels' own code, through their own host launchers, with the PTX primitives (tests/emu/*.cuh stand in for
csrc/cuda's attention_ptx.cuh, tma_ptx.cuh, wgmma_ops.cuh and store_ptx.cuh) executed as the PTX ISA describes
them. Asynchronous work (cp.async, TMA copies, wgmma) lands at issue, at its wait, or at random in between,
and under the random timing warps stall for rounds at a time, so a missing wait, fence or barrier shows up;
the emulator also reports deadlocks, divergent collectives and out-of-bounds accesses by name.

- The Hopper attention kernels (csrc/cuda/attention_sm90.cuh: wgmma, TMA, mbarriers, warp specialization),
  which have not run on a card yet, in every configuration of the tile table, against float64 and against the
  sm_80 kernel (which has run on H100/H200 cards) on the same emulator (tests/emu/attention_emu.cpp).
- GroupNorm(+SiLU) on every path its planner takes on an H100, an A100 and a 48 KB-shared-memory device
  (fused, fused over a thread block cluster, the split path's three kernels), GEGLU's epilogue and the
  one-launch scheduler step, against float64 (tests/emu/kernels_emu.cpp).

What this cannot show: that a card reads wgmma's shared-memory layouts as the PTX ISA describes them
(bench/hopper checks that on a card), and speed.

Seeded bugs below (each a realistic mistake) must make the emulator fail: a suite that passed them would prove
nothing.

    python -m pytest tests/test_cuda_emulated.py     # after editing a CUDA kernel
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))
import emu_build  # noqa: E402

ATTENTION_RUNS = 60  # every (case, configuration) attention_emu.cpp checks
KERNELS_CASES = 22  # kernels_emu.cpp's cases
KERNELS_SOURCES = ["group_norm.cu", "geglu.cu", "scheduler_step.cu"]
TIMINGS = ["eager", "late", "random 1", "random 2"]

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="the emulator's threads are ucontext fibers (Linux)"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulator with"),
]


def run(exe: Path, timing: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *timing.split()], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def attention_emu(tmp_path_factory):
    return emu_build.build(tmp_path_factory.mktemp("attention"), "attention_emu.cpp")


@pytest.fixture(scope="module")
def kernels_emu(tmp_path_factory):
    return emu_build.build(tmp_path_factory.mktemp("kernels"), "kernels_emu.cpp", KERNELS_SOURCES)


@pytest.mark.parametrize("timing", TIMINGS)
def test_hopper_attention_matches_float64_on_the_emulator(attention_emu, timing):
    """fp16 at SD's head dims (40, 64, 80, 160) in all nine configurations (cp.async or TMA loads, 64- or
    128-key tiles, overlapped softmax, ping-pong consumers, the driver without a tensor-map encoder), bf16 in
    the table's; fused q/k/v views, cross-attention over 77 tokens, causal masks, tails of one row and one key,
    K/V expanded over heads. Error within 2x the sm_80 kernel's, nothing written outside the output. With NaN
    and infinities in q, k and v, NaN where the sm_80 kernel has NaN and its values elsewhere."""
    out = run(attention_emu, timing)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.rstrip().endswith(f"OK: {ATTENTION_RUNS} runs"), out.stdout[-2000:]


@pytest.mark.parametrize("timing", TIMINGS)
def test_group_norm_geglu_and_step_match_float64_on_the_emulator(kernels_emu, timing):
    """Each GroupNorm case also checks which path the planner took (one fused launch, its cluster size, or the
    split path's three launches), so a planner change that skips a path fails here instead of going untested."""
    out = run(kernels_emu, timing)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.rstrip().endswith(f"OK: {KERNELS_CASES} cases"), out.stdout[-2000:]


@pytest.mark.parametrize("driver", ["attention_emu.cpp", "kernels_emu.cpp"])
def test_the_kernels_are_clean_under_address_and_ub_sanitizers(tmp_path, driver):
    """The emulator checks what goes through its primitives (shared memory, cp.async, TMA, st.global); a plain
    pointer access in a kernel is seen by AddressSanitizer instead (the inputs end where the tensor ends), and
    undefined behaviour (an overflowing shift or index, a misaligned access) by UBSan."""
    exe = emu_build.build(tmp_path, driver, KERNELS_SOURCES if driver == "kernels_emu.cpp" else [], sanitize=True)
    out = run(exe, "eager")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "runtime error" not in out.stderr and "ERROR: AddressSanitizer" not in out.stderr, out.stderr[-3000:]


# (file under csrc/cuda, the kernel's text, the bug, what the emulator must say): each a mistake these kernels
# invite. The attention ones run on attention_emu in the late timing, the others on kernels_emu.
ATTENTION_MUTANTS = {
    "descriptor strides swapped (LBO along M/N)": (
        "attention_sm90_mainloop.cuh", "return {static_cast<uint32_t>(rows) * 16, 128};",
        "return {128, static_cast<uint32_t>(rows) * 16};", r"EMULATION FAILURE"),
    "S read before its wgmma wait": (
        "attention_sm90_mainloop.cuh", "  turn.pass();\n  wgmma_wait<0>();\n  fence_operands(s);\n}",
        "  turn.pass();\n  fence_operands(s);\n}", r"error \d"),
    "producer waits on the wrong phase of an empty stage": (
        "attention_sm90.cuh", "mbar_wait(&empty[t], ((j / kStages) & 1) ^ 1);",
        "mbar_wait(&empty[t], (j / kStages) & 1);", r"deadlock: no thread can move"),
    "stage released before P.V's wait": (
        "attention_sm90_mainloop.cuh", "      wgmma_wait<0>();\n      fence_operands(o);\n      release(j - 1);",
        "      release(j - 1);\n      wgmma_wait<0>();\n      fence_operands(o);", r"an issued wgmma may still read"),
    "no proxy fence after cp.async": (
        "attention_sm90.cuh", "    fence_proxy_async();\n    __syncthreads();\n  };", "    __syncthreads();\n  };",
        r"without fence\.proxy\.async"),
    "expect_tx counts K but not V": (
        "attention_sm90.cuh", "mbar_arrive_expect_tx(&full[t], 2 * kTileKV);",
        "mbar_arrive_expect_tx(&full[t], kTileKV);", r"a copy is still writing"),
    "P's register fragment in the wrong order": (
        "attention_sm90_mainloop.cuh",
        "pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);\n    pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);",
        "pa[kk][2] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);\n    pa[kk][1] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);",
        r"error \d"),
    "ping-pong consumer never passes the turn": (
        "attention_sm90_mainloop.cuh", "      wgmma_commit();\n      turn.pass();\n      wgmma_wait<1>();",
        "      wgmma_commit();\n      wgmma_wait<1>();", r"deadlock: no thread can move"),
}
KERNELS_MUTANTS = {
    "cluster merge reads rank 0 for every rank": (
        "group_norm_kernels.cuh", "cluster.map_shared_rank(part, static_cast<unsigned>(r));",
        "cluster.map_shared_rank(part, 0u);", r"group_norm fp32 1x64x96x96 .* on H100: y\["),
    "block_sum reuses its scratch without a barrier": (
        "device_utils.cuh", "  __syncthreads();  // a previous call's readers are done with scratch\n", "",
        r"group_norm .*: y\["),
    "weights read as float32 when they are in the input's dtype": (
        "group_norm_kernels.cuh",
        "return f32 ? static_cast<const float*>(p)[c] : to_float(static_cast<const T*>(p)[c]);",
        "return !f32 ? static_cast<const float*>(p)[c] : to_float(static_cast<const T*>(p)[c]);",
        r"w:dtype .*: y\["),
    "a vector crossing a channel row keeps the old channel": (
        "group_norm_kernels.cuh", "          sh[j] = s_shift[ch];\n          if (++col == a.HW) {",
        "          sh[j] = s_shift[ch];\n          if (++col > a.HW) {", r"1x96x7x9 .*: y\["),
    "the step's leftover elements left to block 1": (
        "scheduler_step.cu", "if (blockIdx.x == 0 && static_cast<int64_t>(threadIdx.x) < tail) {",
        "if (blockIdx.x == 1 && static_cast<int64_t>(threadIdx.x) < tail) {", r"scheduler_step .*: element 100[0-2] "),
}


@pytest.mark.parametrize("name", ATTENTION_MUTANTS)
def test_the_emulator_catches_a_seeded_attention_bug(tmp_path, name):
    file, old, new, expected = ATTENTION_MUTANTS[name]
    exe = emu_build.build(tmp_path, "attention_emu.cpp", mutation=(file, old, new), opt="-O0")  # -O0: faster here
    out = run(exe, "late")
    assert out.returncode != 0, f"the emulator passed a kernel with a seeded bug ({name})"
    assert re.search(expected, out.stdout), out.stdout[-3000:]


@pytest.mark.parametrize("name", KERNELS_MUTANTS)
def test_the_emulator_catches_a_seeded_bug_in_the_other_kernels(tmp_path, name):
    file, old, new, expected = KERNELS_MUTANTS[name]
    exe = emu_build.build(tmp_path, "kernels_emu.cpp", KERNELS_SOURCES, mutation=(file, old, new), opt="-O0")
    out = run(exe, "random 1")  # a missing barrier needs warps at different paces
    assert out.returncode != 0, f"the emulator passed a kernel with a seeded bug ({name})"
    assert re.search(expected, out.stdout), out.stdout[-3000:]
