import logging
import os
import subprocess
import sys

import pytest
import torch

import sdcore
from sdcore import _backend, ops, schedulers


def _op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _all_ops():
    q = torch.randn(1, 2, 16, 8)
    x = torch.randn(1, 8, 4, 4)
    s = torch.randn(1, 4, 4, 4)
    ops.attention(q, q, q)
    ops.group_norm(x, 4, silu=True)
    ops.scheduler_step(torch.cat([s, s]), s, schedulers.ddim(0.3, 0.5), guidance_scale=2.0)


def test_kernels_backend_calls_the_extension():
    names = _op_names(_all_ops)
    assert {"sdcore::attention", "sdcore::group_norm", "sdcore::scheduler_step"} <= names


def test_torch_backend_calls_pytorch_builtins():
    with sdcore.use_backend("torch"):
        names = _op_names(_all_ops)
    assert not any(n.startswith("sdcore::") for n in names)
    assert "aten::scaled_dot_product_attention" in names and "aten::group_norm" in names


def test_reference_backend_is_plain_math():
    with sdcore.use_backend("reference"):
        names = _op_names(_all_ops)
    assert not any(n.startswith("sdcore::") for n in names)
    assert "aten::scaled_dot_product_attention" not in names and "aten::softmax" in names


def test_use_backend_restores_and_set_backend_persists():
    assert sdcore.get_backend() == "kernels"
    with sdcore.use_backend("reference"):
        assert sdcore.get_backend() == "reference"
        with sdcore.use_backend("torch"):
            assert sdcore.get_backend() == "torch"
        assert sdcore.get_backend() == "reference"
    assert sdcore.get_backend() == "kernels"
    sdcore.set_backend("torch")
    try:
        assert sdcore.get_backend() == "torch"
    finally:
        sdcore.set_backend("kernels")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown sdcore backend 'fast'"):
        sdcore.set_backend("fast")


@pytest.mark.parametrize("name", ["torch", "reference"])
def test_environment_variable_sets_the_default(name):
    code = "import sdcore; print(sdcore.get_backend())"
    env = dict(os.environ, SDCORE_BACKEND=name)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == name


def test_bad_environment_variable_fails_clearly():
    env = dict(os.environ, SDCORE_BACKEND="nope")
    out = subprocess.run([sys.executable, "-c", "import sdcore; sdcore.get_backend()"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "unknown sdcore backend 'nope'" in out.stderr


def test_fallback_to_torch_is_logged_with_the_reason(caplog):
    _backend._warned.clear()
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="sdcore"):
        out = ops.attention(q, q, q)
    assert out.requires_grad, "the torch fallback keeps autograd working"
    assert "kernels backend can't serve this input" in caplog.text
    assert "inference-only and an input requires grad" in caplog.text
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_fallback_for_a_device_without_kernels(caplog):
    _backend._warned.clear()
    x = torch.randn(1, 8, 4, 4, device="meta")
    with caplog.at_level(logging.WARNING, logger="sdcore"):
        out = ops.group_norm(x, 4)
    assert out.device.type == "meta"
    assert "no sdcore kernels for device type 'meta'" in caplog.text


def test_kernels_reason_is_none_for_cpu_inference_tensors():
    assert ops.kernels_reason(torch.randn(2)) is None
