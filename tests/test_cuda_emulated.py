"""The Hopper attention kernels (csrc/cuda/attention_sm90.cuh: wgmma, TMA, mbarriers, warp specialization) have
not run on a card yet. Here they run on a host emulator of the CUDA execution model (tests/emu/simt.h), with
g++ and no GPU: their own code, through their own launchers, in every configuration of the tile table, with
the PTX primitives (tests/emu/*.cuh stand in for csrc/cuda's attention_ptx.cuh, tma_ptx.cuh and wgmma_ops.cuh)
executed as the PTX ISA describes them. Asynchronous work lands at issue, at its wait, or at random in
between, so a missing wait, fence or barrier shows up; the emulator also reports deadlocks, divergence and
out-of-bounds accesses by name. The sm_80 kernel, which has run on H100/H200 cards, runs on the same emulator
as the yardstick (tests/emu/attention_emu.cpp).

What this cannot show: that a card reads wgmma's shared-memory layouts as the PTX ISA describes them (bench/hopper
checks that on a card), and speed.

Seeded bugs below (each a realistic mistake in the pipeline) must make the emulator fail: a suite that passed
them would prove nothing.

    python -m pytest tests/test_attention_emulated.py     # after editing the Hopper kernels
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "emu"
CUDA = ROOT / "csrc" / "cuda"
# The kernels' headers, copied as they are; the PTX primitive headers are replaced by tests/emu's.
KERNEL_FILES = ["attention_sm90.cuh", "attention_sm90_mainloop.cuh", "attention_launch.cuh", "attention_kernel.cuh",
                "attention_instances.h", "device_info.h", "tensor_map.h"]
STAND_INS = ["attention_ptx.cuh", "tma_ptx.cuh", "wgmma_ops.cuh"]
RUNS = 54  # every (case, configuration) attention_emu.cpp checks

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator's threads are ucontext fibers (Linux)"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulator with"),
]


def scratch_tree(dst: Path, mutation: tuple[str, str, str] | None = None) -> Path:
    """csrc/ with the stand-ins in place of the PTX headers, and the one triple-chevron launch (which g++ can't
    parse) as a call of the emulator's launch(). Returns the folder to put first on the include path."""
    cuda, common = dst / "csrc" / "cuda", dst / "csrc" / "common"
    cuda.mkdir(parents=True)
    shutil.copytree(ROOT / "csrc" / "common", common)
    for name in KERNEL_FILES:
        shutil.copy(CUDA / name, cuda / name)
    for name in STAND_INS:
        assert (CUDA / name).exists(), f"tests/emu/{name} stands in for csrc/cuda/{name}, which is gone"
        shutil.copy(EMU / name, cuda / name)
    launch = cuda / "attention_launch.cuh"
    text, n = re.subn(r"(\w+)<<<(.+?)>>>\((\w+)\);", r"::emu::launch(\1, \2, \3);", launch.read_text())
    assert n == 1, "attention_launch.cuh no longer has exactly one kernel<<<...>>>(args) launch: update scratch_tree"
    launch.write_text(text)
    if mutation is not None:
        name, old, new = mutation
        text = (cuda / name).read_text()
        assert text.count(old) == 1, f"the seeded bug no longer applies to csrc/cuda/{name}: update MUTANTS"
        (cuda / name).write_text(text.replace(old, new))
    return cuda


def build(tmp: Path, mutation=None, opt: str = "-O1") -> Path:
    include = scratch_tree(tmp / "tree", mutation)
    exe = tmp / "attention_emu"
    cmd = ["g++", "-std=c++20", opt, "-D__CUDA_ARCH_FEAT_SM90_ALL", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi",
           "-I", str(EMU), "-I", str(EMU / "include"), "-I", str(include), str(EMU / "attention_emu.cpp"),
           "-o", str(exe)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "warning" not in run.stderr, run.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build(tmp_path_factory.mktemp("emu"))


@pytest.mark.parametrize("timing", ["eager", "late", "random 1", "random 2"])
def test_hopper_attention_matches_float64_on_the_emulator(emulator, timing):
    """fp16 at SD's head dims (40, 64, 80, 160) in all nine configurations (cp.async or TMA loads, 64- or
    128-key tiles, overlapped softmax, ping-pong consumers, the driver without a tensor-map encoder), bf16 in
    the table's; fused q/k/v views, cross-attention over 77 tokens, causal masks, tails of one row and one key,
    K/V expanded over heads. Error within 2x the sm_80 kernel's, nothing written outside the output."""
    run = subprocess.run([str(emulator), *timing.split()], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.rstrip().endswith(f"OK: {RUNS} runs"), run.stdout[-2000:]


# (file, the kernel's text, the bug, what the emulator must say): each a mistake a pipeline like this invites.
MUTANTS = {
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


@pytest.mark.parametrize("name", MUTANTS)
def test_the_emulator_catches_a_seeded_bug(tmp_path, name):
    file, old, new, expected = MUTANTS[name]
    exe = build(tmp_path, (file, old, new), opt="-O0")  # -O0: half the compile time, and it fails in seconds
    run = subprocess.run([str(exe), "late"], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, f"the emulator passed a kernel with a seeded bug ({name})"
    assert re.search(expected, run.stdout), run.stdout[-3000:]
