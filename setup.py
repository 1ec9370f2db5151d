"""Builds sdcore._C: CPU kernels always, CUDA kernels whenever a CUDA toolkit and a CUDA build of torch
are present (a GPU is not needed to compile).

Environment:
  SDCORE_CUDA=0            CPU-only build.
  SDCORE_CUDA=1            CUDA required: fail loudly if it can't be built.
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0+PTX" (default: sm_80 and sm_90 + PTX).
  MAX_JOBS                 parallel compile jobs (ninja), as torch defines it.
  CUDA_HOME                toolkit root; found automatically when unset (also behind an nvcc wrapper).
  SDCORE_SKIP_EXTENSION=1  package only, no compile: `make` builds the extension in place with ninja
                           (incrementally) and then registers the editable package this way.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_env import extra_cuda_include_dirs, find_cuda_home  # noqa: E402
DEFAULT_ARCHS = "8.0;9.0+PTX"


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
    cxx += ["-DSDCORE_WITH_CUDA", f'-DSDCORE_CUDA_ARCHS="{archs.replace(";", " ")}"']
    cxx += [f"-idirafter{d}" for d in extra_cuda_include_dirs()]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"]
    return CUDAExtension("sdcore._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=link)


setup(
    name="sdcore",
    version="0.1.0",
    description="Stable Diffusion on fused CUDA/CPU kernels, with a plain-PyTorch reference path",
    packages=find_packages(include=["sdcore", "sdcore.*"]),
    package_data={"sdcore": ["data/*"]},
    ext_modules=[] if os.environ.get("SDCORE_SKIP_EXTENSION") == "1" else [build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "safetensors", "transformers>=4.53", "pillow", "tqdm"],
    extras_require={"profile": ["matplotlib"],
                    "test": ["pytest", "diffusers", "transformers", "safetensors", "matplotlib"]},
    entry_points={"console_scripts": ["sdcore=sdcore.cli:main"]},
)
