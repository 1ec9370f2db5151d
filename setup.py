"""Builds sdcore._C: CPU kernels always, CUDA kernels whenever a CUDA toolkit and a CUDA build of torch
are present (a GPU is not needed to compile).

Environment:
  SDCORE_CUDA=0            CPU-only build.
  SDCORE_CUDA=1            CUDA required: fail loudly if it can't be built.
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0+PTX" (default: sm_80 and sm_90 + PTX).
  MAX_JOBS                 parallel compile jobs (ninja), as torch defines it.
  CUDA_HOME                toolkit root; found automatically when unset (also behind an nvcc wrapper).
"""
import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
        or glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    )


def _nvcc_behind(path, depth=0):
    """Follow symlinks and `exec /real/nvcc` wrapper scripts to the real nvcc binary."""
    path = os.path.realpath(path)
    if depth > 4 or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return path
    for match in re.finditer(rb"(/[^\s\"'$;]+/nvcc)\b", head):
        target = match.group(1).decode()
        if os.path.realpath(target) != path and os.path.isfile(target):
            return _nvcc_behind(target, depth + 1)
    return None


def find_cuda_home():
    """The toolkit root: $CUDA_HOME if valid, else the root behind the nvcc on PATH, else /usr/local/cuda*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _nvcc_behind(nvcc)
        if real:
            candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit_root(c):
            return os.path.realpath(c)
    return None


def extra_cuda_include_dirs():
    """pip's nvidia-* wheels ship headers (cusparse.h, cublas_v2.h, ...) that torch's CUDA headers include
    but a bare toolkit may lack."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if base and os.path.isdir(base):
            dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isfile(os.path.join(d, "cusparse.h")):
            seen.add(d)
            out.append(d)
    return out


def cuda_request():
    value = os.environ.get("SDCORE_CUDA", "auto").strip().lower()
    if value not in ("0", "1", "auto", ""):
        sys.exit(f"SDCORE_CUDA must be 0, 1 or unset, got {value!r}")
    return value or "auto"


REQUEST = cuda_request()
CUDA_HOME = find_cuda_home() if REQUEST != "0" else None
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    if REQUEST == "0":
        return False, "SDCORE_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (nvcc + libcudart); set CUDA_HOME")
    if reasons:
        if REQUEST == "1":
            sys.exit("SDCORE_CUDA=1 but CUDA kernels can't be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"CUDA {torch.version.cuda}, toolkit {CUDA_HOME}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"


def build_extension():
    with_cuda, why = want_cuda()
    print(f"sdcore: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})", flush=True)
    sources = ["csrc/ops.cpp", "csrc/common/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden", "-DSDCORE_PYTHON_MODULE",
           f'-DSDCORE_BUILT_WITH_TORCH="{torch.__version__}"']
    # at::parallel_for is header code: without -fopenmp the CPU kernels would run on one thread.
    cxx.append("-fopenmp")
    link = ["-fopenmp"]
    if not with_cuda:
        return CppExtension("sdcore._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    cxx += ["-DSDCORE_WITH_CUDA", f'-DSDCORE_CUDA_ARCHS="{archs}"']
    cxx += [f"-idirafter{d}" for d in extra_cuda_include_dirs()]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"]
    return CUDAExtension("sdcore._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=link)


setup(
    name="sdcore",
    version="0.1.0",
    description="Stable Diffusion on fused CUDA/CPU kernels, with a plain-PyTorch reference path",
    packages=find_packages(include=["sdcore", "sdcore.*"]),
    package_data={"sdcore": ["py.typed"]},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "diffusers", "transformers", "safetensors"]},
    entry_points={"console_scripts": ["sdcore=sdcore.cli:main"]},
)
