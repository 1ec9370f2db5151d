import pytest
import torch
import torch.nn.functional as F

from sdcore import ops, reference

from conftest import check_precision, devices, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b, h, n, m, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(device, dtype) for length in (n, m, m)]


def _check(q, k, v, causal=False, scale=None):
    out = ops.attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    # SDPA is only the error yardstick, so it gets dense copies: its efficient-attention kernel faults with
    # "misaligned address" on views whose rows are not 16-byte aligned (torch 2.11, H100); ours must not.
    q_, k_, v_ = (t.contiguous() for t in (q, k, v))
    torch_out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=scale)
    return check_precision(out, torch_out, ref, q.dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 59, 64, 80, 160, 512])
@pytest.mark.parametrize("n,m", [(1, 1), (77, 77), (97, 77), (1025, 97), (64, 1025)])
def test_head_dims_and_lengths(poisoned, device, dtype, d, n, m):
    _check(*_inputs(1, 2, n, m, d, device, dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 80])
def test_sd_self_attention_4096(poisoned, device, dtype, d):
    _check(*_inputs(1, 2, 4096, 4096, d, device, dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vae_mid_block_single_head_512(poisoned, device, dtype):
    _check(*_inputs(1, 1, 4096, 4096, 512, device, dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 77, 97, 130])
def test_causal(poisoned, device, dtype, n):
    _check(*_inputs(2, 3, n, n, 64, device, dtype), causal=True)


@pytest.mark.parametrize("device", devices())
def test_causal_with_more_queries_than_keys_is_top_left(poisoned, device):
    q, k, v = _inputs(1, 2, 9, 5, 16, device, torch.float32)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_batch_heads_and_explicit_scale(poisoned, device, dtype):
    _check(*_inputs(3, 5, 77, 77, 40, device, dtype), scale=0.37)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_views(poisoned, device, dtype):
    g = torch.Generator().manual_seed(1)
    # [B, N, H, D] projections viewed as [B, H, N, D] (how models produce q/k/v), and a sliced head dim.
    qkv = torch.randn(2, 97, 3, 4, 64, generator=g).to(device, dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check(q, k, v)
    wide = torch.randn(2, 3, 50, 96, generator=g).to(device, dtype)
    _check(wide[..., :40], wide[..., 8:48], wide[..., 50:90])


@pytest.mark.parametrize("device", devices())
def test_large_scores_stay_finite(poisoned, device):
    # Scores in the hundreds: without the running max, exp() overflows. Rounding the scores themselves
    # costs ~|score| * 6e-8 in float32, so the bar is PyTorch's own float32 error on the same input.
    q, k, v = _inputs(1, 2, 300, 300, 64, device, torch.float32)
    q, k = q * 30, k * 30
    out = ops.attention(q, k, v)
    ref = reference.attention(q.double(), k.double(), v.double())
    torch_err = rel_error(F.scaled_dot_product_attention(q, k, v), ref)
    assert rel_error(out, ref) <= max(2 * torch_err, 1e-5)
