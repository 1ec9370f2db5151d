import pytest
import torch
import torch.nn.functional as F

from sdcore import _backend, _ext, ops, reference

from conftest import CUDA_SKIP, check_precision, check_special, devices, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b, h, n, m, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(device, dtype) for length in (n, m, m)]


def _check(q, k, v, causal=False, scale=None):
    out = ops.attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    # The kernels write [B, N, H, D] memory (the out-projection's layout); the other backends are contiguous.
    assert out.transpose(1, 2).is_contiguous() if _backend.get_backend() == "kernels" else out.is_contiguous()
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
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_single_head_shorter_than_a_row_block(poisoned, device, threads):
    # The VAE mid-block at a 128x128 image: one head of 256 tokens is less than one CPU row block at D = 512, so
    # the CPU kernel splits it into smaller blocks to give every thread a task (3 threads: blocks of 96 rows,
    # one a tail). Every split must give the same rows.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(*_inputs(1, 1, 256, 256, 512, device, torch.float32))
    finally:
        torch.set_num_threads(before)


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


# --- Strides BLAS can't take, special values, argument types --------------------------------------------------

def _same_special(out, ref):
    """NaN/+inf/-inf where the float32 reference has them, finite elements within float32 tolerance."""
    check_special(out, ref, ref, torch.float32)  # the torch yardstick only matters for half types


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expanded_and_overlapping_rows(poisoned, device, dtype):
    # Rows with stride 0 (expand) or overlapping rows (as_strided): the CPU kernel passed the row stride to
    # BLAS as the leading dimension, which MKL rejects below D ("Parameter 8 was incorrect") leaving the
    # scores unwritten, so q expanded over N came out wrong.
    g = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = _inputs(2, 3, 9, 7, 16, device, dtype)
    _check(mk(2, 3, 1, 16).expand(2, 3, 9, 16), k, v)
    _check(q, k, mk(2, 3, 1, 16).expand(2, 3, 7, 16))
    _check(mk(1, 1, 9, 16).expand(2, 3, 9, 16), mk(2, 1, 7, 16).expand(2, 3, 7, 16), v)
    base = mk(400)
    _check(q, base.as_strided((2, 3, 7, 16), (0, 20, 3, 1)), base.as_strided((2, 3, 7, 16), (5, 11, 2, 1), 7))


@pytest.mark.parametrize("device", devices())
def test_single_row_with_a_stride_below_d(poisoned, device):
    # A size-1 dim may have any stride in torch; [.., 8, 1].transpose gives N = 1 with row stride 1 < D.
    q = torch.randn(1, 2, 16, 1, device=device).transpose(2, 3)
    k = torch.randn(1, 2, 16, 1, device=device).transpose(2, 3)
    assert q.stride(2) == 1
    _check(q, k, k)
    _check(q, *_inputs(1, 2, 5, 5, 16, device, torch.float32)[1:])


def _special_inputs(device, n=6, m=9, d=8, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, length, d, generator=g).to(device) for length in (n, m, m)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_query_row_is_nan(device, dtype):
    # fast_exp clamped NaN to -87 (weight 1e-38 for every key), so the row came out as the mean of v.
    q, k, v = _special_inputs(device)
    q[0, 1, 2, 5] = float("nan")
    out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out[0, 1, 2].isnan().all()
    out[0, 1, 2] = 0
    assert out.isfinite().all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
def test_nan_key_is_not_dropped(device, causal):
    # A NaN key poisons every row that sees it (the reference's softmax); it used to be dropped. Causal rows
    # before it don't see it and stay finite.
    q, k, v = _special_inputs(device)
    k[1, 0, 3, 0] = float("nan")
    out = ops.attention(q, k, v, causal=causal)
    _same_special(out.cpu(), reference.attention(q.double(), k.double(), v.double(), causal=causal).cpu())
    assert out[1, 0, 3:].isnan().all() and out[1, 0, :3].isfinite().all() == causal


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("where", ["q+inf", "q-inf", "k+inf", "k-inf", "v+inf", "v-inf", "v-nan"])
@pytest.mark.parametrize("causal", [False, True])
def test_infinities_match_the_reference(device, where, causal):
    # +inf scores: NaN rows; a row whose scores are all -inf: NaN (0/0), not 0; -inf scores: weight 0.
    q, k, v = _special_inputs(device)
    t = {"q": q, "k": k, "v": v}[where[0]]
    value = float(where[1:])
    t[0, 0, 2, 1] = value
    t[1, 1, 4] = value  # a whole row: q.k = +-inf for every key (or v = +-inf in every column)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    assert not ref.isfinite().all()
    _same_special(ops.attention(q, k, v, causal=causal).cpu(), ref.cpu())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_unseen_nonfinite_value_is_nan_as_in_the_reference(device, dtype):
    # softmax(...) @ v meets the keys a causal row can't see with weight 0, and 0 * NaN = NaN: the reference
    # (and SDPA's math path) make those output columns NaN. The kernels skip those keys; the glue applies
    # the rule. 700 x 1100 spans several CPU row blocks and CUDA key blocks.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, length, 16, generator=g) for length in (700, 1100, 1100))
    v[0, 1, 1099, 3] = float("nan")
    v[0, 0, 650, 2] = float("inf")
    v[0, 0, 10, 7] = float("-inf")
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    out = ops.attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), causal=True)
    for fn in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(fn(out.cpu()), fn(ref))


@pytest.mark.parametrize("device", devices())
def test_zero_scale_keeps_nan_from_inf_scores(device):
    # BLAS skips the product when alpha == 0, so scale=0 gave finite scores where 0 * inf = NaN.
    q, k, v = _special_inputs(device)
    k[0, 1, 2, 3] = float("inf")
    ref = reference.attention(q.double(), k.double(), v.double(), scale=0.0)
    assert ref.isnan().any()
    _same_special(ops.attention(q, k, v, scale=0.0).cpu(), ref.cpu())


@pytest.mark.parametrize("backend", ["kernels", "torch", "reference"])
@pytest.mark.parametrize("call,message", [
    (lambda t: ops.attention(t, [1, 2], t), "sdcore.attention: k must be a torch.Tensor, got list"),
    (lambda t: ops.attention(None, t, t), "sdcore.attention: q must be a torch.Tensor, got NoneType"),
    (lambda t: ops.attention(t, t, t.numpy()), "sdcore.attention: v must be a torch.Tensor, got ndarray"),
    (lambda t: ops.attention(t, t, t, causal=1), "sdcore.attention: causal must be a bool, got int"),
    (lambda t: ops.attention(t, t, t, scale="0.1"), "sdcore.attention: scale must be a real number or None, got str"),
], ids=["k-list", "q-none", "v-ndarray", "causal-int", "scale-str"])
def test_non_tensor_argument_is_a_type_error(backend, call, message):
    import sdcore
    with sdcore.use_backend(backend), pytest.raises(TypeError) as info:
        call(torch.randn(1, 2, 4, 8))
    assert str(info.value) == message


# ------------------------------------------------------------------ the Hopper (sm_90, wgmma) kernel
# Opt-in (SDCORE_CUDA_ATTENTION=sm90) until it has been measured on a card; bench/gpu_check.sh also runs this
# whole file with it on.

def _sm90_unavailable():
    """None where the sm_90 kernel can run here, else why not."""
    if not torch.cuda.is_available():
        return CUDA_SKIP
    reason = _ext.cuda_device_reason(torch.cuda.current_device())
    if reason:
        return reason
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return f"the sm_90 kernel needs a cc 9.0 GPU (H100/H200); this one is sm_{cap[0]}{cap[1]}"
    if not _ext.has_sm90_kernels():
        return "built without 9.0a in TORCH_CUDA_ARCH_LIST, so without the sm_90 kernel"
    return None


needs_sm90 = pytest.mark.skipif(_sm90_unavailable() is not None, reason=str(_sm90_unavailable()))


# The sm_90 table's kernel (Sm90Config::kTma): the TMA producer/consumer one; flash_wgmma_kernel (cp.async) is its
# fallback where no tensor map describes the inputs.
SM90_KERNEL = "flash_wgmma_tma_kernel"


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.setenv("SDCORE_CUDA_ATTENTION", "sm90")


def _cuda_kernels_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@needs_sm90
@pytest.mark.parametrize("choice,kernel,not_kernel", [(None, "flash_reg_kernel", "flash_wgmma"),
                                                      ("sm80", "flash_reg_kernel", "flash_wgmma"),
                                                      ("sm90", SM90_KERNEL, "flash_reg_kernel")])
def test_cuda_attention_kernel_choice(monkeypatch, choice, kernel, not_kernel):
    if choice is None:
        monkeypatch.delenv("SDCORE_CUDA_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("SDCORE_CUDA_ATTENTION", choice)
    q, k, v = _inputs(1, 2, 256, 256, 40, "cuda", torch.float16)
    names = _cuda_kernels_run(lambda: ops.attention(q, k, v))
    assert any(kernel in n for n in names) and not any(not_kernel in n for n in names), names


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP)
def test_cuda_unknown_attention_kernel_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("SDCORE_CUDA_ATTENTION", "sm100")
    q, k, v = _inputs(1, 1, 8, 8, 64, "cuda", torch.float16)
    with pytest.raises(RuntimeError, match="SDCORE_CUDA_ATTENTION must be 'sm80' or 'sm90', not 'sm100'"):
        ops.attention(q, k, v)


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [40, 64, 80, 160])
@pytest.mark.parametrize("n,m,causal", [(1, 1, False), (77, 77, True), (97, 77, False), (1025, 97, False),
                                        (64, 1025, False), (130, 130, True), (200, 64, True), (4096, 4096, False)])
def test_cuda_sm90_head_dims_lengths_and_masks(poisoned, sm90, dtype, d, n, m, causal):
    _check(*_inputs(1, 3, n, m, d, "cuda", dtype), causal=causal)


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_sm90_fused_projection_views_and_odd_batch(poisoned, sm90, dtype):
    g = torch.Generator().manual_seed(3)
    # SD 1.x self-attention as the UNet calls it: q, k, v strided views of one [B, N, 3, H, D] projection.
    qkv = torch.randn(3, 333, 3, 8, 40, generator=g).to("cuda", dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    names = _cuda_kernels_run(lambda: _check(q, k, v, scale=0.3))
    assert any(SM90_KERNEL in n for n in names), names


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_sm90_keys_shared_by_every_head_load_without_tma(poisoned, sm90, dtype):
    # K and V expanded over the heads (head stride 0): no tensor map has a zero stride, so the cp.async kernel
    # runs them, with the same result rules.
    q, k, v = _inputs(2, 4, 333, 97, 64, "cuda", dtype)
    k, v = k[:, :1].expand(-1, 4, -1, -1), v[:, :1].expand(-1, 4, -1, -1)
    assert k.stride(1) == 0
    names = _cuda_kernels_run(lambda: _check(q, k, v))
    assert any("flash_wgmma_kernel" in n for n in names) and not any(SM90_KERNEL in n for n in names), names


@needs_sm90
@pytest.mark.parametrize("d,dtype,kernel", [(59, torch.float16, "flash_reg_kernel"),     # rows not 16-byte
                                            (512, torch.float16, "flash_split_kernel"),  # outside its table
                                            (32, torch.bfloat16, "flash_reg_kernel"),
                                            (64, torch.float32, "flash_simt_kernel")])
def test_cuda_sm90_falls_back_where_it_does_not_apply(poisoned, sm90, d, dtype, kernel):
    q, k, v = _inputs(1, 2, 130, 97, d, "cuda", dtype)
    names = _cuda_kernels_run(lambda: _check(q, k, v))
    assert any(kernel in n for n in names) and not any("flash_wgmma" in n for n in names), names
