"""Loading the compiled extension and describing what it was built with."""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

# Written by setup.py next to the library each time it builds it: the torch (and CUDA) it compiled against.
# Read before the library is loaded, since a library built against another torch may not load at all
# (`undefined symbol: ...`) or may load and crash.
_BUILD_CONFIG = Path(__file__).with_name("_build_config.json")


def _read_build_config() -> dict | None:
    """The build record, or None where there is none (a build by an older setup.py, or none at all)."""
    try:
        return json.loads(_BUILD_CONFIG.read_text())
    except (OSError, ValueError):
        return None


def rebuild_command() -> str:
    """How to rebuild sdcore._C against the torch installed now."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():  # a source checkout, built in place
        return f"`make` (or `python setup.py build_ext --inplace`) in {root}"
    return ("`pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps SOURCE` "
            "with SOURCE the sdcore sdist, source directory or git URL")


def _torch_words(version: str | None, cuda: str | None, without_cuda: str) -> str:
    return f"torch {version} ({'CUDA ' + cuda if cuda else without_cuda})"


def version_mismatch(config: dict | None) -> str | None:
    """None if the recorded build matches the torch imported now, else the error that says so."""
    if not config:
        return None
    built_torch, built_cuda = config.get("torch"), config.get("cuda")
    if built_torch == torch.__version__ and (not built_cuda or built_cuda == torch.version.cuda):
        return None
    built = _torch_words(built_torch, built_cuda, "CPU kernels only")
    now = _torch_words(torch.__version__, torch.version.cuda, "CPU-only")
    return (f"sdcore._C was built with {built} but {now} is installed, so it is "
            f"not loaded (ops run on the torch backend); rebuild it against this torch: {rebuild_command()}")


_CONFIG = _read_build_config()
_error: str | None = version_mismatch(_CONFIG)
if _error is not None:
    warnings.warn(_error, RuntimeWarning, stacklevel=2)
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.sdcore.*)
    except ImportError as exc:  # not built, or built against another torch by a setup.py that kept no record
        _error = f"sdcore._C failed to import: {exc} (build or rebuild it: {rebuild_command()})"


def load_error() -> str | None:
    """None when the extension is loaded, else why it is not."""
    return _error


def _read_build_info() -> dict:
    """What the extension was compiled with. ``built_with_torch`` and ``built_with_cuda`` (None: no CUDA
    kernels) come from the build record when the library is not loaded."""
    config = _CONFIG or {}
    if _error is not None:
        return {"cpu": False, "cuda": False, "cuda_archs": [], "built_with_torch": config.get("torch"),
                "built_with_cuda": config.get("cuda"), "cpu_capability": None, "error": _error}
    fields = dict(item.split("=", 1) for item in torch.ops.sdcore.build_info().split(";"))
    archs = [a for a in fields.get("cuda_archs", "").replace(" ", ";").split(";") if a]
    return {
        "cpu": fields.get("cpu") == "1",
        "cuda": fields.get("cuda") == "1",
        "cuda_archs": archs,
        "built_with_torch": fields.get("built_with_torch"),
        "built_with_cuda": fields.get("built_with_cuda", config.get("cuda")) or None,
        "cpu_capability": fields.get("cpu_capability"),
        "error": None,
    }


# Read once at import: torch.compile cannot trace an op that returns a string.
_BUILD_INFO = _read_build_info()


def build_info() -> dict:
    """What the extension was compiled with: {'cpu': bool, 'cuda': bool, 'cuda_archs': [...],
    'built_with_torch': str | None, 'built_with_cuda': str | None, 'cpu_capability': 'avx512' | 'avx2' |
    'default' | None (the CPU kernels' build in use), 'error': str | None}."""
    return _BUILD_INFO


def has_sm90_kernels() -> bool:
    """Whether the build carries the Hopper (wgmma) attention kernel: its arch list has 9.0a (sm_90a code),
    which is when setup.py compiles the kernel's instantiation files."""
    return "9.0a" in [a.split("+")[0] for a in build_info()["cuda_archs"]]


def _arch_number(arch: str) -> tuple[int, int]:
    major, minor = arch.replace("+PTX", "").split(".")
    return int(major), int(minor.rstrip("a"))


@torch.compiler.assume_constant_result
def cuda_device_reason(index: int) -> str | None:
    """None if the compiled CUDA kernels can run on device ``index``, else why not. torch.compile treats the
    answer as a constant of the graph rather than tracing the device query."""
    return _cuda_device_reason(index)


@functools.lru_cache(maxsize=None)
def _cuda_device_reason(index: int) -> str | None:
    info = build_info()
    if not info["cuda"]:
        return "sdcore was built without CUDA kernels (see `sdcore info`)"
    cap = torch.cuda.get_device_capability(index)
    archs = info["cuda_archs"]
    # Exact SASS for this major.minor, a same-major SASS of a lower minor, or PTX from an older arch.
    for arch in archs:
        major, minor = _arch_number(arch)
        if (major, minor) == cap or (major == cap[0] and minor <= cap[1]):
            return None
        if arch.endswith("+PTX") and (major, minor) <= cap:
            return None
    return f"device {index} is sm_{cap[0]}{cap[1]} but kernels were compiled for {';'.join(archs)}"
