
import pytest
import torch

import sdcore
from sdcore import _ext

CUDA_SKIP = "no CUDA device visible to torch (CUDA kernels are compiled; run the tests on a GPU machine)"


def devices():
    """cpu always; cuda as a parameter that skips, with the reason, where there is no GPU."""
    params = ["cpu"]
    marks = []
    if not torch.cuda.is_available():
        marks.append(pytest.mark.skip(reason=CUDA_SKIP))
    elif _ext.cuda_device_reason(torch.cuda.current_device()):
        marks.append(pytest.mark.skip(reason=_ext.cuda_device_reason(torch.cuda.current_device())))
    params.append(pytest.param("cuda", marks=marks))
    return params


@pytest.fixture(autouse=True)
def _kernels_backend():
    """Every test starts on the kernels backend, and the extension must be loaded."""
    assert _ext.load_error() is None, _ext.load_error()
    with sdcore.use_backend("kernels"):
        yield


@pytest.fixture
def poisoned():
    """Fill every new tensor torch allocates (the ops' outputs included) with NaN, so an output element a
    kernel forgot to write fails the comparison instead of holding a lucky value."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64; NaN/inf anywhere in out counts as infinite error."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_precision(kernel_out, torch_out, ref, dtype):
    """The project's tolerance rule: float32 within 1e-5 of float64; half types within 2x the error of
    PyTorch's own op in the same precision (that precision's epsilon as a floor)."""
    err = rel_error(kernel_out, ref)
    if dtype == torch.float32:
        assert err <= 1e-5, f"float32 error {err:.3e} > 1e-5"
    else:
        torch_err = rel_error(torch_out, ref)
        tol = max(2 * torch_err, torch.finfo(dtype).eps)
        assert err <= tol, f"{dtype} error {err:.3e} > 2 x torch error {torch_err:.3e}"
    return err
