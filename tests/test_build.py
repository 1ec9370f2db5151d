"""The build: CUDA kernels are compiled wherever a toolkit and a CUDA torch exist (GPU or not), and the
CMake build of the same sources produces a library torch can load."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdcore import _ext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cuda_env  # noqa: E402


def test_cpu_kernels_are_built():
    assert _ext.build_info()["cpu"]


@pytest.mark.skipif(os.environ.get("SDCORE_CUDA") == "0", reason="SDCORE_CUDA=0 asked for a CPU-only build")
def test_cuda_kernels_are_built_when_a_toolkit_is_present():
    if torch.version.cuda is None or cuda_env.find_cuda_home() is None:
        pytest.skip(f"no CUDA toolkit or CPU-only torch ({torch.__version__}): nothing to compile CUDA with")
    info = _ext.build_info()
    assert info["cuda"], "a CUDA toolkit and a CUDA torch are present, but the extension was built CPU-only"
    assert info["cuda_archs"], "the build must record its CUDA archs"


def test_generated_attention_instances_match_a_fresh_run():
    """The checked-in instantiation files are what tools/gen_attention_instances.py writes now (none missing,
    edited or stale), so the build never needs the script and the script can't drift from the build."""
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_attention_instances.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _cuda_release(tool):
    """(major, minor) of a CUDA tool from its --version banner ("release 13.0, V13.0.88"), or None."""
    try:
        out = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuobjdump(home):
    """The toolkit's cuobjdump, else the one Triton's package carries (a pip toolkit may have none), but only
    one at least as new as the toolkit's nvcc: an older one misreads what a newer compiler wrote (torch
    2.11's Triton carries CUDA 12.8's, which lists CUDA 13.0's sm_90a cubins as sm_90)."""
    candidates = [Path(home) / "bin" / "cuobjdump"]
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    nvcc = _cuda_release(Path(home) / "bin" / "nvcc")
    for c in candidates:
        if c.exists():
            release = _cuda_release(c)
            if nvcc is None or (release is not None and release >= nvcc):
                return str(c)
    return None


def test_wgmma_wrappers_match_a_fresh_run():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_wgmma_ops.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_hopper_harness_compiles_for_sm90a(tmp_path):
    """bench/hopper (the layout tests of the sm_90 attention kernel that bench/gpu_check.sh runs on an
    H100/H200) keeps compiling against the kernel's header, every configuration it times: ptxas accepts it for
    sm_90a with the instructions the kernel is about (HGMMA; the TMA variant's tensor copies, UTMALDG, its
    mbarrier waits, setmaxnreg and the ping-pong's barrier arrivals), nothing in local memory and no wgmma it had
    to serialize."""
    home = cuda_env.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit: nothing to compile the harness with")
    exe = tmp_path / "wgmma_attention"
    build = subprocess.run([os.path.join(home, "bin", "nvcc"), "-O3", "-std=c++17",
                            "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
                            str(ROOT / "bench" / "hopper" / "wgmma_attention.cu"),
                            str(ROOT / "csrc" / "cuda" / "device_info.cpp"),
                            str(ROOT / "csrc" / "cuda" / "tensor_map.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    report = build.stdout + build.stderr
    assert "bytes stack frame" in report and all(
        line.strip().startswith("0 bytes stack frame") for line in report.splitlines() if "bytes stack frame" in line)
    # ptxas serializes wgmma it can't prove warpgroup-uniform or whose registers it must move ("Potential
    # Performance Loss: wgmma.mma_async instructions are serialized ..."): the kernel must not trigger it.
    assert "Performance Loss" not in report, [line for line in report.splitlines() if "Performance Loss" in line]
    # The 128-key TMA kernels move registers from the producer warpgroup (24) to the two consumers (240). The
    # block's pool is what it was launched with, so the kernel's count must be the 384-thread cap, 168:
    # 128 x 24 + 256 x 240 = 384 x 168. Fewer, and the consumers' raise would wait forever.
    moving = re.findall(r"entry function '(\w*flash_wgmma_tma_kernel\w*Li2ELi128E\w*)'.*?Used (\d+) registers",
                        report, flags=re.S)
    # D 48/64/80 x (plain, overlap, overlap with ping-pong)
    assert len(moving) == 9 and all(int(regs) == 168 for _, regs in moving), moving
    cuobjdump = _cuobjdump(home)
    if cuobjdump is not None:
        sass = subprocess.run([cuobjdump, "-sass", str(exe)], capture_output=True, text=True).stdout
        for width in (48, 64, 80, 160):
            assert f"HGMMA.64x{width}x16.F32" in sass, f"no 64x{width} wgmma in the harness's SASS"
        assert "UTMALDG.5D" in sass and "SYNCS.PHASECHK" in sass, "no TMA copy or mbarrier wait in the harness"
        assert "USETMAXREG.DEALLOC.CTAPOOL 0x18" in sass and "USETMAXREG.TRY_ALLOC.CTAPOOL" in sass
        assert "BAR.ARV" in sass, "the ping-pong kernels' named-barrier arrivals are missing"


def test_tma_tensor_maps_land_tiles_in_the_kernels_shared_layout(tmp_path):
    """The Hopper attention's TMA tensor maps (csrc/cuda/tensor_map.h) put every element of a Q/K/V tile where
    its main loop reads it (attn::core_offset), zeros past the rows and the head dim, for SD's head dims and
    strided views; and refuse what no map describes. A host program replays the box copies, no GPU needed."""
    home = cuda_env.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit: nothing to compile the check with")
    exe = tmp_path / "tma_layout_check"
    build = subprocess.run([os.path.join(home, "bin", "nvcc"), "-std=c++17", "-arch=sm_80",
                            str(ROOT / "tests" / "tma_layout_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("OK: 6 layouts, 5 refusals"), run.stdout + run.stderr


def test_extension_has_the_hopper_kernels_when_built_for_sm90a():
    """The arch axis of the build: with 9.0a in the arch list (the default), the extension carries sm_90a code
    with both wgmma attention kernels (TMA producer/consumer and its cp.async fallback) for every (dtype, padded
    head dim) of its table, fp16 and bf16; without it, none of that code (the sm90 instantiation files are not
    compiled at all)."""
    info = _ext.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only build has no CUDA code to inspect")
    home = cuda_env.find_cuda_home()
    cuobjdump = _cuobjdump(home) if home else None
    if cuobjdump is None:
        pytest.skip("no cuobjdump (toolkit or triton) as new as the toolkit's nvcc to read the extension's SASS with")
    lib = Path(_ext.__file__).parent
    so = next(iter(sorted(lib.glob("_C*.so"))), None)
    assert so is not None, f"no compiled extension in {lib}"
    listing = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True).stdout
    with_sm90a = _ext.has_sm90_kernels()
    assert ("sm_90a" in listing) == with_sm90a, listing
    if not with_sm90a:
        return
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90a", str(so)], capture_output=True, text=True).stdout
    kernels = {line.split("Function : ")[1].strip() for line in sass.splitlines() if "Function : " in line}
    # __half and __nv_bfloat16 at 48, 64, 80, 160 (the mangled names carry the dtype and Li<dp>E).
    for name in ("flash_wgmma_kernel", "flash_wgmma_tma_kernel"):
        wgmma = sorted(k for k in kernels if name in k)
        for dtype in ("6__half", "13__nv_bfloat16"):
            for dp in (48, 64, 80, 160):
                assert any(dtype in k and f"Li{dp}E" in k for k in wgmma), (name, dtype, dp, wgmma)
    assert "UTMALDG.5D" in sass
    for width in (48, 64, 80, 160):
        assert f"HGMMA.64x{width}x16.F32.BF16" in sass and f"HGMMA.64x{width}x16.F32 " in sass, width


def test_build_records_the_torch_it_compiled_against():
    # setup.py writes the record next to the library; sdcore/_ext.py reads it before loading the library.
    record = _ext._read_build_config()
    assert record is not None, f"no {_ext._BUILD_CONFIG.name} next to sdcore._C: rebuild it with setup.py"
    info = _ext.build_info()
    assert record["torch"] == info["built_with_torch"] == torch.__version__
    assert record["cuda"] == info["built_with_cuda"] == (torch.version.cuda if info["cuda"] else None)
    assert record["cuda_archs"].split(";") == info["cuda_archs"] if info["cuda"] else record["cuda_archs"] == ""


def _reason_with(monkeypatch, archs, cap):
    info = {"cpu": True, "cuda": True, "cuda_archs": archs, "built_with_torch": "x", "error": None}
    monkeypatch.setattr(_ext, "_BUILD_INFO", info)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: cap)
    _ext._cuda_device_reason.cache_clear()
    try:
        return _ext._cuda_device_reason(0)
    finally:
        _ext._cuda_device_reason.cache_clear()


def test_arch_matching(monkeypatch):
    # sm_90 runs sm_90 SASS; sm_89 runs sm_80 SASS (same major); sm_100 runs only PTX.
    for cap, ok in [((9, 0), True), ((8, 9), True), ((10, 0), True), ((7, 5), False)]:
        reason = _reason_with(monkeypatch, ["8.0", "9.0+PTX"], cap)
        assert (reason is None) == ok, (cap, reason)
    assert "compiled for 8.0;9.0" in _reason_with(monkeypatch, ["8.0", "9.0"], (10, 0))
    # The default: sm_80 SASS + PTX, and Hopper's arch-specific sm_90a, which runs on cc 9.0 only.
    for cap, ok in [((9, 0), True), ((8, 0), True), ((8, 6), True), ((10, 0), True), ((12, 0), True), ((7, 5), False)]:
        reason = _reason_with(monkeypatch, ["8.0+PTX", "9.0a"], cap)
        assert (reason is None) == ok, (cap, reason)
    assert "compiled for 9.0a" in _reason_with(monkeypatch, ["9.0a"], (10, 0))


def test_device_query_compiles_into_one_graph(monkeypatch):
    # The kernels backend asks cuda_device_reason inside every op call; torch.compile(fullgraph=True) must
    # take the answer as a constant rather than break the graph on the device query.
    monkeypatch.setattr(_ext, "_BUILD_INFO", {"cpu": True, "cuda": True, "cuda_archs": ["9.0"],
                                              "built_with_torch": "x", "error": None})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    _ext._cuda_device_reason.cache_clear()
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda x: x + (1.0 if _ext.cuda_device_reason(0) is None else 2.0),
                           fullgraph=True, backend="eager")
        assert fn(torch.zeros(2)).tolist() == [1.0, 1.0]
    finally:
        _ext._cuda_device_reason.cache_clear()
        torch._dynamo.reset()


def test_cmake_build_loads_and_runs(tmp_path):
    build = tmp_path / "cmake"
    args = ["cmake", "-S", str(ROOT), "-B", str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"]
    home = cuda_env.find_cuda_home()
    if torch.version.cuda is not None and home is not None:
        # torch's CMake config of a CUDA build looks for the toolkit even for a CPU-only target.
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={home}", f"-DCUDAToolkit_ROOT={home}"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    done = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lib = build / "libsdcore_ops.so"
    assert lib.exists()
    # A fresh interpreter: the library registers the same op names as sdcore._C.
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        assert "cpu=1" in torch.ops.sdcore.build_info()
        q = torch.randn(1, 2, 33, 40)
        out = torch.ops.sdcore.attention(q, q, q, False, None)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double())
        assert (out.double() - ref).abs().max() < 1e-5, "wrong result"
        x = torch.randn(2, 32, 5, 5)
        y = torch.ops.sdcore.group_norm(x, 8, None, None, 1e-5, True)
        r = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 8))
        assert (y.double() - r).abs().max() < 1e-5, "wrong result"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_gpu_check_script_parses_and_its_files_exist():
    """bench/gpu_check.sh gets one run per lent GPU: a syntax error or a moved file would waste it. bash must
    parse it, and every repository file it names must exist."""
    script = ROOT / "bench" / "gpu_check.sh"
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    named = set(re.findall(r"\b((?:bench|csrc|tests|tools)/[\w./-]+\.(?:py|cu|cpp|sh))\b", script.read_text()))
    assert "bench/hopper/wgmma_attention.cu" in named and "bench/sanitize_ops.py" in named, named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing
