
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings

import sdcore
from sdcore import _ext

# Property tests (tests/test_ops_properties.py) must be deterministic in CI: the same examples every run
# (derandomize), nothing remembered between runs (database=None), no timing flakes on a loaded machine
# (deadline=None), a bounded number of examples, and a failure prints the blob that reproduces it
# (@reproduce_failure). SDCORE_HYPOTHESIS_PROFILE=explore draws new examples, and more of them.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=200, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", settings.get_profile("ci"), derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("SDCORE_HYPOTHESIS_PROFILE", "ci"))

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


def rel_error(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """max |out - ref| / max(max |ref|, scale), in float64; NaN/inf anywhere in out counts as infinite error."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(max(scale, 1e-30))).item()


def check_precision(kernel_out, torch_out, ref, dtype, scale: float = 0.0):
    """The project's tolerance rule: float32 within 1e-5 of float64; half types within 2x the error of
    PyTorch's own op in the same precision (that precision's epsilon as a floor). Errors are relative to
    max |ref|, or to `scale` when larger: the size of the terms a result is summed from, where they may
    cancel (a few elements of a linear combination)."""
    err = rel_error(kernel_out, ref, scale)
    if dtype == torch.float32:
        assert err <= 1e-5, f"float32 error {err:.3e} > 1e-5"
    else:
        torch_err = rel_error(torch_out, ref, scale)
        tol = max(2 * torch_err, torch.finfo(dtype).eps)
        assert err <= tol, f"{dtype} error {err:.3e} > 2 x torch error {torch_err:.3e}"
    return err


def check_special(kernel_out, torch_out, ref, dtype, scale: float = 0.0):
    """check_precision for outputs that may hold NaN/inf: NaN, +inf and -inf exactly where the reference (rounded
    to the op's dtype, as the reference backend returns it) has them, and the finite elements by the tolerance
    rule. For half types the torch yardstick is measured where both it and the reference are finite (torch's
    special-value rules differ in places, e.g. SDPA's all -inf rows)."""
    out, ref = kernel_out.double().cpu(), ref.double().cpu()
    rounded = ref.to(dtype).double()
    for name, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        want, got = fn(rounded), fn(out)
        assert torch.equal(got, want), (f"{name} positions differ: kernel {got.sum().item()}, reference "
                                        f"{want.sum().item()}, first mismatch at {(got != want).nonzero()[0].tolist()}")
    finite = torch.isfinite(rounded)
    if not finite.any():
        return 0.0
    torch_out = torch_out.double().cpu()
    both = finite & torch.isfinite(torch_out)
    yardstick = torch_out.where(both, ref)  # elements torch got non-finite don't count towards its error
    return check_precision(out[finite], yardstick[finite], ref[finite], dtype, scale)


def run_in_threads(worker, count: int) -> list[BaseException]:
    """Runs worker(0) .. worker(count - 1) in threads at once, and returns what they raised, for the main
    thread to report (an exception in a thread alone would only be printed)."""
    errors = []

    def guarded(i):
        try:
            worker(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
