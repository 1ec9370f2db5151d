"""GEGLU's fused epilogue (torch.ops.sdcore.geglu: bias, exact GELU and gate in one pass) and the public
ops.geglu layer, against float64 math, by the project's tolerance rule."""
import pytest
import torch
import torch.nn.functional as F

import sdcore
from sdcore import ops, reference

from conftest import check_precision, check_special, devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_epilogue(h, bias):
    """What the unfused layer runs after its GEMM, in h's precision: the yardstick for half types."""
    value, gate = (h if bias is None else h + bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def _check(h, bias, dtype):
    out = torch.ops.sdcore.geglu(h, bias)
    assert out.shape == (*h.shape[:-1], h.shape[-1] // 2) and out.dtype == h.dtype and out.is_contiguous()
    ref = reference.gated_gelu(h.double(), None if bias is None else bias.double())
    return check_precision(out, _torch_epilogue(h, bias), ref, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(2, 256, 2560), (2, 77, 640), (1, 1, 2), (3, 5, 74), (7, 2 * 37), (130,)])
def test_matches_float64(poisoned, device, dtype, with_bias, shape):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(*shape, generator=g) * 3).to(device, dtype)
    bias = torch.randn(shape[-1], generator=g).to(device, dtype) if with_bias else None
    _check(h, bias, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_are_read_in_place(poisoned, device, dtype):
    """A column slice of a wider GEMM output (rows 3F + 8 apart, over two leading dims), a transposed view
    (rows not evenly strided, so copied first) and a single row with strided elements (copied too) give the
    values of their dense copies."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(3, 4, 3 * 48 + 8, generator=g).to(device, dtype)
    for h in (wide[..., 8:8 + 96], torch.randn(96, 12, generator=g).to(device, dtype).t(),
              torch.randn(96, 3, generator=g).to(device, dtype)[:, 0][None]):
        bias = torch.randn(h.shape[-1], generator=g).to(device, dtype)
        assert not h.is_contiguous()
        torch.testing.assert_close(torch.ops.sdcore.geglu(h, bias), torch.ops.sdcore.geglu(h.contiguous(), bias),
                                   rtol=0, atol=0)
        _check(h, bias, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(poisoned, device, dtype):
    """NaN, +-inf and huge values in value, gate and bias come out as the float64 formula gives them:
    gelu(-inf) = -inf * 0 = NaN, gelu(+inf) = +inf, and far negative gates give (signed) zeros."""
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -1e30, -30.0, -5.0, -1.0, 0.0, 0.5, 5.0,
                            1e4, 1e30])
    n = special.numel()
    value = special.repeat_interleave(n)
    gate = special.repeat(n)  # every (value, gate) pair
    h = torch.cat([value, gate]).to(device, dtype)[None]  # float16 rounds the 1e30s to inf: more specials
    out = torch.ops.sdcore.geglu(h, None)
    ref = reference.gated_gelu(h.double())
    check_special(out, _torch_epilogue(h, None), ref, dtype)


@pytest.mark.parametrize("device", devices())
def test_empty_rows(device):
    h = torch.empty(0, 3, 8, device=device)
    assert torch.ops.sdcore.geglu(h, torch.ones(8, device=device)).shape == (0, 3, 4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("args,error,message", [
    (lambda d: (torch.randn(3, 5, device=d), None), RuntimeError, "the last dim of h must be even"),
    (lambda d: (torch.tensor(2.0, device=d), None), RuntimeError, "at least one dim"),
    (lambda d: (torch.randn(3, 4, device=d), torch.randn(3, device=d)), RuntimeError, "bias must have shape [4]"),
    (lambda d: (torch.randn(3, 4, device=d).int(), None), TypeError, "h must be float32, float16 or bfloat16"),
    (lambda d: (torch.randn(3, 4, device=d), torch.ones(4, device=d).int()), TypeError,
     "bias must be float32, float16 or bfloat16"),
])
def test_bad_input_names_the_problem(device, args, error, message):
    with pytest.raises(error) as info:
        torch.ops.sdcore.geglu(*args(device))
    assert message in str(info.value)


@pytest.mark.parametrize("backend", ["kernels", "torch", "reference"])
def test_layer_on_every_backend(backend):
    """ops.geglu is the diffusers GEGLU layer (Linear, chunk, value * gelu(gate)) on every backend."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 33, 40, generator=g)
    weight, bias = torch.randn(160, 40, generator=g) * 0.2, torch.randn(160, generator=g)
    with sdcore.use_backend(backend):
        out = ops.geglu(x, weight, bias)
    value, gate = F.linear(x.double(), weight.double(), bias.double()).chunk(2, dim=-1)
    ref = value * F.gelu(gate)
    assert out.dtype == torch.float32 and out.shape == (2, 33, 80)
    check_precision(out, out, ref, torch.float32, scale=float(value.abs().max()))


@pytest.mark.parametrize("backend", ["kernels", "torch", "reference"])
def test_layer_rejects_an_odd_weight(backend):
    with sdcore.use_backend(backend), pytest.raises(ValueError, match=r"even number of rows"):
        ops.geglu(torch.randn(2, 4), torch.randn(5, 4))
