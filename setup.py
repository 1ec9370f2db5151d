"""Builds sdcore._C: CPU kernels always, CUDA kernels whenever a CUDA toolkit and a CUDA build of torch
are present (a GPU is not needed to compile). The project's metadata is in pyproject.toml; the version is
sdcore/_version.py's.

Build without build isolation, against the torch sdcore will run with:
  pip install --no-build-isolation .        (or an sdist / git URL instead of .)
  pip wheel --no-build-isolation .
  python setup.py build_ext --inplace       (what `make` runs, incrementally)

Environment:
  SDCORE_CUDA=0            CPU-only build.
  SDCORE_CUDA=1            CUDA required: fail loudly if it can't be built.
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0a" (default "8.0+PTX;9.0a": sm_80 code + PTX for newer GPUs, and
                           sm_90a, the Hopper code with the wgmma attention kernel; "9.0" builds sm_90 code
                           without that kernel).
  MAX_JOBS                 parallel compile jobs (ninja), as torch defines it.
  CUDA_HOME                toolkit root; found automatically when unset (also behind an nvcc wrapper).
  SDCORE_SKIP_EXTENSION=1  package only, no compile: `make` builds the extension in place with ninja
                           (incrementally) and then registers the editable package this way.

Next to the extension the build writes sdcore/_build_config.json (the torch and CUDA versions it compiled
against, its archs), which sdcore/_ext.py reads before loading the library: a torch that differs gets
one clear error naming both versions and the rebuild command, never an `undefined symbol`.
"""
import glob
import json
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_env import extra_cuda_include_dirs, find_cuda_home  # noqa: E402
from sdcore_backend import require_torch  # noqa: E402

DEFAULT_ARCHS = "8.0+PTX;9.0a"
BUILD_CONFIG = "_build_config.json"
# Commands that compile or install the extension; anything else (egg_info, dist_info, sdist, clean) only
# needs the metadata, so an sdist builds without torch.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "install", "develop", "editable_wheel"}


def cuda_request():
    value = os.environ.get("SDCORE_CUDA", "auto").strip().lower()
    if value not in ("0", "1", "auto", ""):
        sys.exit(f"SDCORE_CUDA must be 0, 1 or unset, got {value!r}")
    return value or "auto"


def want_cuda(torch, request, cuda_home):
    if request == "0":
        return False, "SDCORE_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (nvcc + libcudart); set CUDA_HOME")
    if reasons:
        if request == "1":
            sys.exit("SDCORE_CUDA=1 but CUDA kernels can't be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"CUDA {torch.version.cuda}, toolkit {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"


def build_extension():
    """The extension and what to record about it, or exit with one line when torch can't be imported."""
    request = cuda_request()
    cuda_home = find_cuda_home() if request != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    require_torch()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, why = want_cuda(torch, request, cuda_home)
    print(f"sdcore: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})", flush=True)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
    record = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None,
              "cuda_archs": archs.replace(" ", ";")}

    sources = ["csrc/ops.cpp", "csrc/common/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Headers as dependencies: setuptools skips an extension whose listed files are all older than it.
    depends = sorted(glob.glob("csrc/common/*.h") + glob.glob("csrc/cpu/*.h"))
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden", "-DSDCORE_PYTHON_MODULE",
           f'-DSDCORE_BUILT_WITH_TORCH="{torch.__version__}"']
    # at::parallel_for is header code: without -fopenmp the CPU kernels would run on one thread.
    cxx.append("-fopenmp")
    link = ["-fopenmp"]
    if not with_cuda:
        ext = CppExtension("sdcore._C", sources, depends=depends, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
        return ext, BuildExtension, record
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    # The Hopper kernels' instantiation files only when the build makes sm_90a code (the arch-specific
    # Hopper target that has wgmma); SDCORE_WITH_SM90A tells the dispatch they are there.
    with_sm90a = "9.0a" in [a.split("+")[0] for a in archs.replace(" ", ";").split(";")]
    sources += [f for f in cuda_sources if with_sm90a or not os.path.basename(f).startswith("attention_sm90_")]
    depends += sorted(glob.glob("csrc/cuda/*.h") + glob.glob("csrc/cuda/*.cuh"))
    cxx += ["-DSDCORE_WITH_CUDA", f'-DSDCORE_CUDA_ARCHS="{archs.replace(";", " ")}"',
            f'-DSDCORE_BUILT_WITH_CUDA="{torch.version.cuda}"']
    cxx += [f"-idirafter{d}" for d in extra_cuda_include_dirs()]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"]
    if with_sm90a:
        cxx.append("-DSDCORE_WITH_SM90A")
        nvcc.append("-DSDCORE_WITH_SM90A")
    ext = CUDAExtension("sdcore._C", sources, depends=depends, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                        extra_link_args=link)
    return ext, BuildExtension, record


def build_ext_command(build_extension_class, record):
    """torch's BuildExtension (ninja), which also writes the build record next to the library it builds,
    and rebuilds when the record changes (another torch, SDCORE_CUDA or arch list), not only when a source
    file is newer than the library."""

    class build_ext(build_extension_class):
        def _record_path(self):
            return os.path.join(os.path.dirname(self.get_ext_fullpath("sdcore._C")), BUILD_CONFIG)

        def run(self):
            path = self._record_path()
            try:
                with open(path) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = None
            if previous != record:
                self.force = True
            super().run()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")

    return build_ext.with_options(use_ninja=True)


def extension_and_commands():
    if os.environ.get("SDCORE_SKIP_EXTENSION") == "1":
        return [], {}
    if not BUILD_COMMANDS.intersection(sys.argv[1:]):
        return [], {}
    ext, build_extension_class, record = build_extension()
    return [ext], {"build_ext": build_ext_command(build_extension_class, record)}


ext_modules, cmdclass = extension_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
