"""linear_add (x @ weight.T + bias + residual: the residual added by the GEMM that ends an attention, a
feed-forward or a spatial transformer), the op and the public layer, against float64 math by the project's
tolerance rule; and the UNet and VAE blocks that use it."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sdcore
from sdcore import ops, reference
from sdcore.models.layers import SpatialSelfAttention
from sdcore.models.unet_blocks import Transformer

from conftest import check_precision, devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(g, lead, k, n, device, dtype, with_bias=True):
    x = torch.randn(*lead, k, generator=g).to(device, dtype)
    weight = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype) if with_bias else None
    residual = torch.randn(*lead, n, generator=g).to(device, dtype)
    return x, weight, bias, residual


def _check(x, weight, bias, residual, dtype):
    out = torch.ops.sdcore.linear_add(x, weight, bias, residual)
    assert out.shape == residual.shape and out.dtype == x.dtype and out.is_contiguous()
    ref = reference.linear_add(x.double(), weight.double(), None if bias is None else bias.double(), residual.double())
    torch_out = F.linear(x, weight, bias) + residual  # the unfused layer in the same precision: the yardstick
    # Relative to the size of the terms, which may cancel in a few elements.
    scale = float(residual.abs().max()) + (0.0 if bias is None else float(bias.abs().max()))
    return check_precision(out, torch_out, ref, dtype, scale=scale)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lead,k,n", [((2, 256), 320, 320), ((2, 77), 40, 33), ((1, 1), 8, 8), ((3, 5), 7, 1),
                                      ((), 130, 24), ((4,), 1280, 2)])
def test_matches_float64(poisoned, device, dtype, with_bias, lead, k, n):
    g = torch.Generator().manual_seed(0)
    _check(*_inputs(g, lead, k, n, device, dtype, with_bias), dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_operands(poisoned, device, dtype):
    """Row-strided views (a column slice of a wider tensor, a channels_last map's pixels) are read in place;
    a transposed x, weight or residual is copied first; the values are the same either way."""
    g = torch.Generator().manual_seed(1)
    x, weight, bias, residual = _inputs(g, (2, 48), 64, 40, device, dtype)
    wide_x = torch.randn(2, 48, 64 + 16, generator=g).to(device, dtype)[..., 8:72]
    wide_w = torch.randn(40, 96, generator=g).to(device, dtype)[:, 4:68] / 8
    wide_r = torch.randn(2, 48, 56, generator=g).to(device, dtype)[..., 16:]
    nhwc = torch.randn(2, 40, 6, 8, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    pixels = nhwc.permute(0, 2, 3, 1).reshape(2, 48, 40)  # a view: rows of 40 channels
    cases = [(wide_x, weight, residual), (x, wide_w, residual), (x, weight, wide_r), (x, weight, pixels),
             (x.transpose(0, 1).contiguous().transpose(0, 1), weight.t().contiguous().t(), residual)]
    for xi, wi, ri in cases:
        _check(xi, wi, bias, ri, dtype)
    nchw_pixels = nhwc.contiguous().permute(0, 2, 3, 1).reshape(2, 48, 40)  # not a view: reshape copies
    _check(x, weight, bias, nchw_pixels, dtype)


@pytest.mark.parametrize("device", devices())
def test_empty_and_zero_width(device):
    """No rows or no outputs: an empty result; no inputs (k = 0): residual + bias."""
    empty = torch.ops.sdcore.linear_add(torch.empty(0, 3, 8, device=device), torch.ones(5, 8, device=device),
                                        torch.ones(5, device=device), torch.empty(0, 3, 5, device=device))
    assert empty.shape == (0, 3, 5)
    assert torch.ops.sdcore.linear_add(torch.ones(3, 8, device=device), torch.ones(0, 8, device=device), None,
                                       torch.ones(3, 0, device=device)).shape == (3, 0)
    residual, bias = torch.randn(3, 4, device=device), torch.randn(4, device=device)
    out = torch.ops.sdcore.linear_add(torch.empty(3, 0, device=device), torch.empty(4, 0, device=device), bias,
                                      residual)
    torch.testing.assert_close(out, residual + bias, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("args,error,message", [
    (lambda d: (torch.randn(3, 5, device=d), torch.randn(4, 6, device=d), None, torch.randn(3, 4, device=d)),
     RuntimeError, "weight must be [out_features, 5]"),
    (lambda d: (torch.randn(3, 5, device=d), torch.randn(4, 5, device=d), None, torch.randn(3, 5, device=d)),
     RuntimeError, "residual must have shape [3, 4]"),
    (lambda d: (torch.randn(3, 5, device=d), torch.randn(4, 5, device=d), torch.randn(5, device=d),
                torch.randn(3, 4, device=d)), RuntimeError, "bias must have shape [4]"),
    (lambda d: (torch.tensor(2.0, device=d), torch.randn(4, 1, device=d), None, torch.randn(4, device=d)),
     RuntimeError, "at least one dim"),
    (lambda d: (torch.randn(3, 5, device=d), torch.randn(4, 5, device=d).half(), None, torch.randn(3, 4, device=d)),
     TypeError, "weight has dtype Half but x has dtype Float"),
    (lambda d: (torch.randn(3, 5, device=d).int(), torch.randn(4, 5, device=d).int(), None,
                torch.randn(3, 4, device=d).int()), TypeError, "x must be float32, float16 or bfloat16"),
])
def test_bad_input_names_the_problem(device, args, error, message):
    with pytest.raises(error) as info:
        torch.ops.sdcore.linear_add(*args(device))
    assert message in str(info.value)


@pytest.mark.parametrize("backend", ["kernels", "torch", "reference"])
def test_layer_on_every_backend(backend):
    """ops.linear_add is Linear + add on every backend, and rejects mismatched shapes on every backend (the
    torch one would otherwise broadcast a [out] residual)."""
    g = torch.Generator().manual_seed(2)
    x, weight, bias, residual = _inputs(g, (2, 33), 40, 24, "cpu", torch.float32)
    with sdcore.use_backend(backend):
        out = ops.linear_add(x, weight, bias, residual)
        with pytest.raises(ValueError, match=r"residual must have shape \[2, 33, 24\]"):
            ops.linear_add(x, weight, bias, residual[0, 0])
        with pytest.raises(ValueError, match=r"bias must have shape \[24\]"):
            ops.linear_add(x, weight, bias[:5], residual)
        with pytest.raises(ValueError, match=r"weight must be \[out_features, in_features\]"):
            ops.linear_add(x, weight.t(), bias, residual)
    ref = F.linear(x.double(), weight.double(), bias.double()) + residual.double()
    assert out.dtype == torch.float32 and out.shape == (2, 33, 24)
    check_precision(out, out, ref, torch.float32, scale=float(residual.abs().max()))


def _linear_add_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "sdcore::linear_add")


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_blocks_add_their_residuals_in_the_gemm(channels_last):
    """A spatial transformer of two blocks adds 3 residuals per block in the GEMMs (attention, cross-attention,
    feed-forward) and, for a channels_last map, its own residual in proj_out's GEMM: 7 calls NHWC, 6 NCHW, where
    an NCHW map keeps the separate add so its output stays NCHW. The VAE's attention likewise (1 or 0). The
    kernels backend matches the torch backend (diffusers' unfused adds) either way, in the input's layout."""
    torch.manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    transformer = Transformer(64, heads=2, context_dim=24, depth=2, groups=8, linear=False, upcast=False).eval()
    vae_attention = SpatialSelfAttention(64, groups=8, eps=1e-6).eval()
    x = torch.randn(2, 64, 6, 5).contiguous(memory_format=fmt)
    context = torch.randn(2, 7, 24)
    with torch.no_grad():
        for module, args, calls in ((transformer, (x, context), 7 if channels_last else 6),
                                    (vae_attention, (x,), 1 if channels_last else 0)):
            with sdcore.use_backend("torch"):
                want = module(*args)
            got = module(*args)
            assert _linear_add_calls(lambda: module(*args)) == calls
            assert got.is_contiguous(memory_format=fmt) and want.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
