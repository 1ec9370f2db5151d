"""Loading the compiled extension and describing what it was built with."""
from __future__ import annotations

import functools

import torch

_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.sdcore.*)
except ImportError as exc:  # not built, or built against another torch
    _error = f"sdcore._C failed to import: {exc}"


def load_error() -> str | None:
    """None when the extension is loaded, else why it is not."""
    return _error


def _read_build_info() -> dict:
    if _error is not None:
        return {"cpu": False, "cuda": False, "cuda_archs": [], "built_with_torch": None, "error": _error}
    fields = dict(item.split("=", 1) for item in torch.ops.sdcore.build_info().split(";"))
    archs = [a for a in fields.get("cuda_archs", "").replace(" ", ";").split(";") if a]
    return {
        "cpu": fields.get("cpu") == "1",
        "cuda": fields.get("cuda") == "1",
        "cuda_archs": archs,
        "built_with_torch": fields.get("built_with_torch"),
        "error": None,
    }


# Read once at import: torch.compile cannot trace an op that returns a string.
_BUILD_INFO = _read_build_info()


def build_info() -> dict:
    """What the extension was compiled with: {'cpu': bool, 'cuda': bool, 'cuda_archs': [...], ...}."""
    return _BUILD_INFO


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
