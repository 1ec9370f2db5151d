import pytest
import torch
import torch.nn.functional as F

from sdcore import ops, reference

from conftest import check_precision, check_special, devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(shape, groups, device, dtype, *, silu=True, channels_last=False, affine=True, eps=1e-5, offset=0.5,
         seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + offset).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = torch.randn(shape[1], generator=g).to(device, dtype) if affine else None
    b = torch.randn(shape[1], generator=g).to(device, dtype) if affine else None
    out = ops.group_norm(x, groups, w, b, eps, silu=silu)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.stride() == x.stride(), "output must keep the input's memory format"
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.group_norm(x.double(), groups, dbl(w), dbl(b), eps, silu=silu)
    torch_out = F.group_norm(x, groups, w, b, eps)
    torch_out = F.silu(torch_out) if silu else torch_out
    return check_precision(out, torch_out, ref, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8),
                                   (2, 1920, 16, 16), (2, 960, 32, 32)])
def test_unet_shapes(poisoned, device, dtype, channels_last, shape):
    _run(shape, 32, device, dtype, channels_last=channels_last)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_transformer_proj_in_norm_without_silu(poisoned, device, channels_last):
    _run((2, 320, 64, 64), 32, device, torch.float32, silu=False, eps=1e-6, channels_last=channels_last)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", [((1, 512, 128, 128), True), ((1, 256, 256, 256), False)])
def test_vae_decoder_shapes(poisoned, device, dtype, shape, channels_last):
    _run(shape, 32, device, dtype, eps=1e-6, channels_last=channels_last)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_vae_1024_output_block(device, channels_last):
    # 128 ch x 1024 x 1024: the largest GroupNorm in SD (134 M elements). Also checks that statistics
    # over 4 M elements per group stay accurate.
    _run((1, 128, 1024, 1024), 32, device, torch.float32, eps=1e-6, channels_last=channels_last)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", [((3, 4, 9, 11), 2), ((1, 6, 1, 1), 3), ((5, 64, 97, 1), 8),
                                          ((2, 30, 7, 13), 30), ((1, 64, 8, 8), 1), ((2, 96, 15, 20), 6)])
def test_awkward_shapes(poisoned, device, dtype, channels_last, shape, groups):
    _run(shape, groups, device, dtype, channels_last=channels_last)


# On a 132-SM card (H100, H200) the fused CUDA path stages these groups in 48,900-49,110 bytes of dynamic shared
# memory: within 48 KiB, but not within 48 KiB less the kernel's static shared memory, which is the real limit
# without the opt-in (once failed with "invalid argument"); 1, 4 and 8 blocks per group.
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,dtype", [((5, 320, 35, 35), torch.float32), ((2, 320, 99, 99), torch.float16),
                                         ((1, 960, 57, 57), torch.float32)], ids=["fp32-1", "fp16-4", "fp32-8"])
def test_shared_memory_just_under_48k(poisoned, device, channels_last, shape, dtype):
    _run(shape, 32, device, dtype, channels_last=channels_last)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(2, 32), (2, 32, 50), (1, 32, 4, 5, 6)])
def test_other_ranks(poisoned, device, shape):
    _run(shape, 8, device, torch.float32)


@pytest.mark.parametrize("device", devices())
def test_channels_last_3d(poisoned, device):
    _run((1, 32, 4, 5, 6), 8, device, torch.float32, channels_last=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (2, 64, 400, 400)])
def test_large_mean_small_variance(poisoned, device, affine, channels_last, shape):
    # |mean| / std = 1e4: the naive E[x^2] - E[x]^2 in float32 loses every digit here. The large shape has
    # hundreds of channels_last pixel blocks, whose partial sums are merged in double.
    _run(shape, 32, device, torch.float32, offset=1e4, affine=affine, silu=False, channels_last=channels_last)


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape,groups", [((2, 2560, 8, 8), 32), ((1, 256, 20, 20), 32), ((3, 200, 9, 7), 25)])
def test_channels_last_small_images_every_thread_count(poisoned, threads, silu, shape, groups):
    # On the CPU, channels_last images whose slices fit in L2 run both passes in one task per (image, run of
    # whole groups), with fewer groups per run until every thread has a task: each thread count gives other
    # runs (unequal ones too: 32 groups in 3 runs), 400 pixels two pixel blocks, and 16 threads the three-pass
    # path for 1x256x20x20. The large mean checks each run's merge of its channels' sums into groups.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run(shape, groups, "cpu", torch.float32, offset=1e4, silu=silu, channels_last=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", devices())
def test_non_dense_input_gives_contiguous_output(poisoned, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 16, 32, generator=g).to(device)[..., ::2]
    out = ops.group_norm(x, 8, silu=True)
    assert out.is_contiguous()
    ref = reference.group_norm(x.double(), 8, silu=True)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("device", devices())
def test_half_input_with_float32_affine(poisoned, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g).to(device, torch.float16)
    w, b = torch.randn(64, generator=g).to(device), torch.randn(64, generator=g).to(device)
    out = ops.group_norm(x, 32, w, b, silu=True)
    ref = reference.group_norm(x.double(), 32, w.double(), b.double(), silu=True)
    assert out.dtype == torch.float16
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 2e-3


# --- Special values, strides, argument types ------------------------------------------------------------------

def _same_special(out, ref):
    """NaN/+inf/-inf where the float32 reference has them, finite elements within float32 tolerance."""
    check_special(out, ref, ref, torch.float32)  # the torch yardstick only matters for half types


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_silu_of_minus_inf_is_nan(device, channels_last):
    # y * sigmoid(y) at y = -inf is -inf * 0 = NaN (the reference and F.silu); the CPU kernel's
    # y / (1 + exp(min(-y, 80))) gave -inf. A large finite negative y gives -0, not y / (1 + e^80).
    x = torch.randn(2, 8, 3, 5, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.zeros(8, device=device)
    bias[1], bias[2], bias[3] = float("-inf"), float("inf"), -1e30
    out = ops.group_norm(x, 4, None, bias, silu=True)
    _same_special(out, reference.group_norm(x.double(), 4, None, bias.double(), silu=True))
    assert out[:, 1].isnan().all() and out[:, 2].isposinf().all() and (out[:, 3] == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu", [False, True])
def test_infinite_weight_gives_signed_infinities(device, channels_last, silu):
    # (x - mean) / std * inf is +-inf by the sign of x - mean. The kernels folded the low part of the mean into
    # the shift, mean_lo * inf = +-inf (NaN when mean_lo = 0), which made the whole channel NaN.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g).to(device)
    x[1, 6:] = torch.arange(32.0).reshape(2, 4, 4)  # a group whose mean (15.5) is exact: mean_lo = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, generator=g).to(device)
    weight[1], weight[2], weight[7] = float("inf"), float("-inf"), float("inf")
    ref = reference.group_norm(x.double(), 4, weight.double(), None, silu=silu)
    assert not ref[:, 1].isfinite().any()
    _same_special(ops.group_norm(x, 4, weight, None, silu=silu), ref)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_nan_and_inf_in_x_poison_their_group(device, dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 3, generator=g)
    x[0, 1, 2, 2], x[1, 4, 0, 1], x[1, 7, 1, 1] = float("nan"), float("inf"), float("-inf")
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, generator=g).to(device, dtype), torch.randn(8, generator=g).to(device, dtype)
    out = ops.group_norm(x, 4, w, b, silu=True)
    ref = F.silu(F.group_norm(x.double(), 4, w.double(), b.double()))
    assert torch.equal(out.isnan().cpu(), ref.isnan().cpu())
    assert out.isnan().sum() == 3 * 2 * 9  # groups (0, 0), (1, 2), (1, 3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expanded_views_of_x_weight_and_bias(poisoned, device, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 1, 5, generator=g).to(device, dtype).expand(2, 8, 6, 5)
    w = torch.randn(1, generator=g).to(device, dtype).expand(8)
    b = torch.randn(20, generator=g).to(device, dtype)[3::2][:8]
    out = ops.group_norm(x, 2, w, b, silu=True)
    ref = reference.group_norm(x.double(), 2, w.double(), b.double(), silu=True)
    torch_out = F.silu(F.group_norm(x, 2, w, b))
    check_precision(out, torch_out, ref, dtype)


@pytest.mark.parametrize("backend", ["kernels", "torch", "reference"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(x=[1.0]), "sdcore.group_norm: x must be a torch.Tensor, got list"),
    (dict(weight=(1, 2)), "sdcore.group_norm: weight must be a torch.Tensor or None, got tuple"),
    (dict(bias=1.0), "sdcore.group_norm: bias must be a torch.Tensor or None, got float"),
    (dict(num_groups=2.0), "sdcore.group_norm: num_groups must be an int, got float"),
    (dict(num_groups=True), "sdcore.group_norm: num_groups must be an int, got bool"),
    (dict(eps="1e-5"), "sdcore.group_norm: eps must be a real number, got str"),
    (dict(eps=None), "sdcore.group_norm: eps must be a real number, got NoneType"),
], ids=["x", "weight", "bias", "groups-float", "groups-bool", "eps-str", "eps-none"])
def test_non_tensor_argument_is_a_type_error(backend, kwargs, message):
    import sdcore
    args = dict(x=torch.randn(1, 4, 2, 2), num_groups=2, weight=None, bias=None, eps=1e-5) | kwargs
    with sdcore.use_backend(backend), pytest.raises(TypeError) as info:
        ops.group_norm(**args)
    assert str(info.value) == message


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    x = torch.randn(1, 4, 2, 2)
    out = ops.group_norm(x, np.int64(2), eps=np.float32(1e-5))
    assert torch.allclose(out, F.group_norm(x, 2), atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((2, 64, 9, 11), False), ((2, 64, 9, 11), True),
                                                 ((1, 128, 96, 96), False), ((1, 128, 96, 96), True)])
def test_weight_in_the_input_dtype_or_float32(poisoned, device, dtype, shape, channels_last):
    """Weight and bias in x's dtype are read as they are (no conversion launch); float32 ones, or a mix, are
    read as float32. Half values convert to float32 exactly, so every combination gives bitwise one result."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g).to(device, dtype)
    b = torch.randn(shape[1], generator=g).to(device, dtype)
    want = ops.group_norm(x, 32, w.float(), b.float(), 1e-5, silu=True)
    for wi, bi in ((w, b), (w, b.float()), (w.float(), b), (w, None), (None, b)):
        got = ops.group_norm(x, 32, wi, bi, 1e-5, silu=True)
        same = ops.group_norm(x, 32, None if wi is None else wi.float(), None if bi is None else bi.float(), 1e-5,
                              silu=True)
        assert torch.equal(got, same), (wi is None or wi.dtype, bi is None or bi.dtype)
        if wi is not None and bi is not None:
            assert torch.equal(got, want)
