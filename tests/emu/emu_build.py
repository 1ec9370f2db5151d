"""Builds sdcore's CUDA sources for the host emulator (tests/emu/simt.h) with g++: a scratch copy of csrc/ in
which tests/emu's stand-ins replace the headers that hold inline PTX, and the three constructs g++ can't
compile are rewritten into calls of the emulator:
    kernel<<<grid, block, smem, stream>>>(args);   ->  ::emu::launch(kernel, ::emu::Config(grid, ...), args);
    extern __shared__ ... smem[];                  ->  unsigned char* smem = <the block's dynamic shared memory>;
    __shared__ T a[N], b[M];                       ->  T* a = ::emu::block_static<T>(...); (one per block)
The test modules (tests/test_*_emulated.py) call build(); nothing here runs on import."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "tests" / "emu"
# csrc/cuda's headers of inline PTX, each replaced by tests/emu's file of the same name.
STAND_INS = ["attention_ptx.cuh", "tma_ptx.cuh", "wgmma_ops.cuh", "store_ptx.cuh"]

_LAUNCH = re.compile(r"(\b[\w:]+(?:<(?:[^<>;]|<[^<>;]*>)*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
_DYNAMIC = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];")
_STATIC = re.compile(r"__shared__\s+(\w+)\s+([^;]+);")


def _statics(m: re.Match) -> str:
    decls = []
    for d in m.group(2).split(","):
        name, count = re.fullmatch(r"\s*(\w+)\[(\w+)\]\s*", d).groups()
        key = f"{m.group(1)} {name}[{count}]"
        decls.append(f'{m.group(1)}* {name} = ::emu::block_static<{m.group(1)}>("{key}", {count});')
    return " ".join(decls)


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(r"::emu::launch(\1, ::emu::Config(\2), \3);", text)
    text = _DYNAMIC.sub(r"unsigned char* \1 = ::emu::cur_block()->smem.data();", text)
    return _STATIC.sub(_statics, text)


def scratch_tree(dst: Path, mutation: tuple[str, str, str] | None = None) -> Path:
    """csrc/ rewritten for the emulator under dst; returns its cuda/ folder (first on the include path).
    mutation: (file under csrc/cuda, its text, the replacement), a seeded bug, applied exactly once."""
    shutil.copytree(ROOT / "csrc", dst / "csrc", ignore=shutil.ignore_patterns("cpu"))
    cuda = dst / "csrc" / "cuda"
    for name in STAND_INS:
        assert (cuda / name).exists(), f"tests/emu/{name} stands in for csrc/cuda/{name}, which is gone"
        shutil.copy(EMU / name, cuda / name)
    for path in sorted(cuda.iterdir()):
        if path.name in STAND_INS or path.suffix not in (".cu", ".cuh", ".h"):
            continue
        text = rewrite(path.read_text())
        for construct in ("<<<", "__shared__", "asm volatile", "asm("):
            assert construct not in text, f"csrc/cuda/{path.name}: {construct} the emulator can't compile"
        path.write_text(text)
    if mutation is not None:
        name, old, new = mutation
        text = (cuda / name).read_text()
        assert text.count(old) == 1, f"the seeded bug no longer applies to csrc/cuda/{name}"
        (cuda / name).write_text(text.replace(old, new))
    return cuda


def build(tmp: Path, driver: str, kernel_sources: list[str] = (), mutation=None, opt: str = "-O1",
          sanitize: bool = False) -> Path:
    """Compiles tests/emu/<driver> with device.cpp and the scratch copies of csrc/cuda's kernel_sources.
    sanitize: with AddressSanitizer and UndefinedBehaviorSanitizer, whose first report ends the run."""
    cuda = scratch_tree(tmp / "tree", mutation)
    exe = tmp / Path(driver).stem
    cmd = ["g++", "-std=c++20", opt, "-D__CUDA_ARCH__=900", "-D__CUDA_ARCH_FEAT_SM90_ALL", "-Wall",
           "-Wno-unknown-pragmas", "-Wno-psabi", "-I", str(EMU / "include"), "-I", str(EMU), "-I", str(cuda),
           str(EMU / driver), str(EMU / "device.cpp")]
    if sanitize:
        cmd += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    if kernel_sources:
        cmd += ["-x", "c++", *[str(cuda / s) for s in kernel_sources]]
    run = subprocess.run(cmd + ["-o", str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "warning" not in run.stderr, run.stderr[-4000:]
    return exe
