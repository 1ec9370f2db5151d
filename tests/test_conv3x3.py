"""conv3x3 (the 3x3, stride 1, padding 1 convolution; on the CPU the kernels backend's Winograd F(2x2, 3x3)):
the op against float64 math, its chunks, threads, concurrent callers, special values and errors, and which
convolutions of the models take it."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sdcore
from sdcore import ops, reference
from sdcore.models.layers import Conv3x3, ResnetBlock

from conftest import check_precision, run_in_threads

pytestmark = pytest.mark.skipif(sdcore._ext.load_error() is not None, reason="the sdcore extension is not built")


def _inputs(seed, b, cin, cout, h, w, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    return x, weight, (torch.randn(cout, generator=g) if bias else None)


def _errors(out, x, weight, bias):
    """RMS and max error of out and of PyTorch's float32 convolution against a float64 one."""
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    mine, torch_err = out.double() - ref, F.conv2d(x, weight, bias, padding=1).double() - ref
    rms = lambda e: e.pow(2).mean().sqrt().item()  # noqa: E731
    return rms(mine), rms(torch_err), ref


# Odd sides (a last tile with one column or row), one pixel, one channel, batch 3, 1-4 tiles per row.
AWKWARD = [(1, 1, 1, 1, 1), (2, 5, 7, 7, 9), (3, 17, 4, 1, 2), (1, 32, 64, 13, 10), (1, 64, 3, 5, 5),
           (2, 16, 1, 4, 4), (1, 8, 8, 3, 1), (2, 3, 2, 2, 3)]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_op_matches_float64(poisoned, shape, with_bias):
    x, weight, bias = _inputs(0, *shape, bias=with_bias)
    out = torch.ops.sdcore.conv3x3(x, weight, bias)
    assert out.shape == (shape[0], shape[2], shape[3], shape[4]) and out.is_contiguous()
    ref = reference.conv3x3(x.double(), weight.double(), None if bias is None else bias.double())
    check_precision(out, F.conv2d(x, weight, bias, padding=1), ref, torch.float32)


# The SD shapes ops.conv3x3 sends to Winograd, smallest images first (the 8x8 level of a 512^2 UNet is in
# test_routing): the FA rule in float32, RMS error at most 2x PyTorch's own.
@pytest.mark.parametrize("shape", [(2, 320, 320, 32, 32), (2, 640, 320, 16, 16), (2, 1280, 1280, 8, 8),
                                   (2, 2560, 1280, 4, 8), (1, 128, 128, 33, 17), (1, 512, 512, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_error_within_twice_torch(shape):
    x, weight, bias = _inputs(1, *shape)
    assert ops._conv3x3_route(x, weight, bias) == "winograd"
    with sdcore.use_backend("kernels"):
        out = ops.conv3x3(x, weight, bias)
    mine, torch_err, ref = _errors(out, x, weight, bias)
    assert mine <= 2 * torch_err, f"RMS error {mine:.3e} > 2 x torch's {torch_err:.3e}"
    check_precision(out, None, ref, torch.float32)


# Under 64 pixels the wide layers (C x Co >= 1280^2) take one GEMM over the 3x3 patches: the 4x4 level of a
# 256^2 UNet (CFG batch 2, and its 2560-channel concatenations), one image, 1x1 and odd sides, no bias.
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(2, 1280, 1280, 4, 4), (2, 2560, 1280, 4, 4), (1, 1280, 1280, 4, 4),
                                   (2, 1280, 1280, 1, 1), (1, 1920, 1280, 3, 5), (3, 1280, 1440, 2, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_small_images_of_wide_layers_take_one_gemm(shape, with_bias):
    x, weight, bias = _inputs(6, *shape, bias=with_bias)
    assert ops._conv3x3_route(x, weight, bias) == "gemm"
    with sdcore.use_backend("kernels"):
        out = ops.conv3x3(x, weight, bias)
    assert out.shape == (shape[0], shape[2], shape[3], shape[4]) and out.is_contiguous()
    mine, torch_err, ref = _errors(out, x, weight, bias)
    assert mine <= 2 * torch_err, f"RMS error {mine:.3e} > 2 x torch's {torch_err:.3e}"
    check_precision(out, None, ref, torch.float32)


@pytest.mark.parametrize("shape", [(2, 192, 160, 37, 1100), (2, 96, 200, 7, 9)], ids=["streamed", "fused"])
@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_chunks_and_threads(threads, shape):
    """streamed: 38 tile rows over two images at 4 rows per chunk: chunks that straddle the images, an odd last
    one; the GEMMs split by output channel blocks at 16 threads. fused: 40 tiles, so each task transforms its
    block of output channels' filters into its thread's buffer: blocks of 32 channels (the last one of 8) at up
    to 3 threads, of 8 at 16 threads."""
    x, weight, bias = _inputs(2, *shape)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.sdcore.conv3x3(x, weight, bias)
    finally:
        torch.set_num_threads(old)
    mine, torch_err, ref = _errors(out, x, weight, bias)
    assert mine <= 2 * torch_err
    check_precision(out, None, ref, torch.float32)


def test_concurrent_callers_get_their_own_workspace():
    """Calls from several threads at once, of different sizes, each get the right result (the workspace pool
    hands each call its own buffer): two with U streamed, two with few enough tiles for the fused path, where
    each of a call's threads has its own part of the buffer."""
    cases = [_inputs(10 + i, 1, 96 + 32 * i, 64, 24 + 8 * i, 40) for i in range(2)]
    cases += [_inputs(12 + i, 2, 96 + 32 * i, 72, 6 + 4 * i, 10) for i in range(2)]
    expected = [torch.ops.sdcore.conv3x3(*c) for c in cases]
    results = {}

    def work(i):
        for _ in range(3):
            results[i] = torch.ops.sdcore.conv3x3(*cases[i])
            assert torch.equal(results[i], expected[i])

    errors = run_in_threads(work, len(cases))
    assert not errors, errors
    for i, c in enumerate(cases):
        check_precision(results[i], None, reference.conv3x3(*(t.double() for t in c)), torch.float32)


def test_non_finite_inputs_stay_local():
    """A NaN or inf input makes exactly the outputs of its 3x3 neighbourhood non-finite, as in the direct
    convolution (Winograd's ± transforms may turn an inf there into NaN)."""
    x, weight, bias = _inputs(3, 1, 16, 8, 10, 11)
    x[0, 3, 4, 5] = float("nan")
    x[0, 7, 0, 10] = float("inf")
    x[0, 1, 9, 0] = float("-inf")
    out = torch.ops.sdcore.conv3x3(x, weight, bias)
    want = ~torch.isfinite(F.conv2d(x, weight, bias, padding=1))
    assert torch.equal(~torch.isfinite(out), want) and want.sum() > 0
    assert torch.isnan(out[0, :, 3:6, 4:7]).all()


def test_empty_and_channel_free():
    assert torch.ops.sdcore.conv3x3(torch.empty(0, 4, 5, 5), torch.ones(3, 4, 3, 3), None).shape == (0, 3, 5, 5)
    assert torch.ops.sdcore.conv3x3(torch.empty(2, 4, 0, 5), torch.ones(3, 4, 3, 3), None).shape == (2, 3, 0, 5)
    bias = torch.randn(3)
    out = torch.ops.sdcore.conv3x3(torch.empty(2, 0, 4, 5), torch.empty(3, 0, 3, 3), bias)
    torch.testing.assert_close(out, bias.view(1, 3, 1, 1).expand(2, 3, 4, 5), rtol=0, atol=0)
    assert torch.equal(torch.ops.sdcore.conv3x3(torch.empty(1, 0, 2, 2), torch.empty(3, 0, 3, 3), None),
                       torch.zeros(1, 3, 2, 2))


def test_strided_input_is_read_as_its_values():
    x, weight, bias = _inputs(4, 2, 24, 8, 12, 20)
    wide = torch.cat([x, x], dim=3)[..., 20:]  # a view, not contiguous
    torch.testing.assert_close(torch.ops.sdcore.conv3x3(wide, weight, bias),
                               torch.ops.sdcore.conv3x3(x, weight, bias), rtol=0, atol=0)


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.sdcore.conv3x3(torch.ones(2, 3, 4), torch.ones(1, 3, 3, 3), None), "x must be 4-D"),
    (lambda: torch.ops.sdcore.conv3x3(torch.ones(1, 3, 4, 4), torch.ones(2, 4, 3, 3), None),
     r"weight must be \[out_channels, 3, 3, 3\]"),
    (lambda: torch.ops.sdcore.conv3x3(torch.ones(1, 3, 4, 4), torch.ones(2, 3, 5, 5), None), "weight must be"),
    (lambda: torch.ops.sdcore.conv3x3(torch.ones(1, 3, 4, 4), torch.ones(2, 3, 3, 3), torch.ones(3)),
     r"bias must have shape \[2\]"),
    (lambda: torch.ops.sdcore.conv3x3(torch.ones(1, 3, 4, 4).half(), torch.ones(2, 3, 3, 3).half(), None),
     "x must be float32"),
    (lambda: torch.ops.sdcore.conv3x3(torch.ones(1, 3, 4, 4), torch.ones(2, 3, 3, 3).double(), None),
     "weight has dtype"),
    (lambda: ops.conv3x3(torch.ones(1, 3, 4, 4), torch.ones(2, 4, 3, 3)), r"weight must be \[out_channels, 3"),
    (lambda: ops.conv3x3(torch.ones(3, 4, 4), torch.ones(2, 3, 3, 3)), "x must be 4-D"),
    (lambda: ops.conv3x3(torch.ones(1, 3, 4, 4), torch.ones(2, 3, 3, 3), torch.ones(1, 2)), "bias must have shape"),
])
def test_errors_name_the_problem(call, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        call()


def _conv_ops(fn, gemm=False):
    """(Winograd calls, PyTorch convolutions[, patch GEMMs]) in fn's profile."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    counts = names.count("sdcore::conv3x3"), sum(n == "aten::convolution" for n in names)
    return counts + (sum(n in ("aten::addmm", "aten::mm") for n in names),) if gemm else counts


def test_routing():
    """On the kernels backend the resnet's two 3x3 convolutions take Winograd at the UNet's sizes; the 1x1
    shortcut, channels_last, bfloat16, thin inputs, tiny images, SDCORE_WINOGRAD=0 and the torch backend take
    PyTorch's convolution."""
    block = ResnetBlock(320, 640, 32, 1e-5).eval()
    x = torch.randn(2, 320, 32, 32)
    with torch.no_grad(), sdcore.use_backend("kernels"):
        assert _conv_ops(lambda: block(x)) == (2, 1)
        assert _conv_ops(lambda: block(x.contiguous(memory_format=torch.channels_last))) == (0, 3)
        assert _conv_ops(lambda: block.bfloat16()(x.bfloat16())) == (0, 3)
        block.float()
        assert _conv_ops(lambda: block(x[:, :, :8, :8])) == (0, 3)  # 128 pixels
        assert _conv_ops(lambda: ops.conv3x3(torch.randn(2, 1280, 8, 8), torch.randn(1280, 1280, 3, 3))) == (1, 0)
        small = torch.randn(2, 1280, 4, 4)  # 32 pixels of a wide layer: one GEMM, with or without the bias
        assert _conv_ops(lambda: ops.conv3x3(small, torch.randn(1280, 1280, 3, 3)), gemm=True) == (0, 0, 1)
        assert _conv_ops(lambda: ops.conv3x3(small, torch.randn(1280, 1280, 3, 3), torch.randn(1280)),
                         gemm=True) == (0, 0, 1)
        assert _conv_ops(lambda: ops.conv3x3(small.transpose(2, 3), torch.randn(1280, 1280, 3, 3))) == (0, 1)
        assert _conv_ops(lambda: ops.conv3x3(torch.randn(2, 640, 4, 4), torch.randn(640, 640, 3, 3))) == (0, 1)
        empty = ops.conv3x3(torch.randn(0, 1280, 4, 4), torch.randn(1280, 1280, 3, 3), torch.randn(1280))
        assert empty.shape == (0, 1280, 4, 4)
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):  # an empty side: F.conv2d's word
            ops.conv3x3(torch.randn(2, 1280, 0, 4), torch.randn(1280, 1280, 3, 3))
        assert _conv_ops(lambda: ops.conv3x3(torch.randn(2, 4, 64, 64), torch.randn(320, 4, 3, 3))) == (0, 1)
        assert _conv_ops(lambda: ops.conv3x3(torch.randn(2, 320, 64, 64), torch.randn(4, 320, 3, 3))) == (0, 1)
    with torch.no_grad(), sdcore.use_backend("torch"):
        assert _conv_ops(lambda: block(x)) == (0, 3)


@pytest.mark.parametrize("shape", [(1, 128, 128, 32, 32), (2, 1280, 1280, 4, 4)], ids=["winograd", "gemm"])
def test_winograd_switch_off(monkeypatch, shape):
    """SDCORE_WINOGRAD=0 turns off both of sdcore's lowerings: every conv3x3 is PyTorch's convolution."""
    x, weight, bias = _inputs(5, *shape)
    monkeypatch.setenv("SDCORE_WINOGRAD", "0")
    with sdcore.use_backend("kernels"):
        assert _conv_ops(lambda: ops.conv3x3(x, weight, bias), gemm=True) == (0, 1, 0)
        torch.testing.assert_close(ops.conv3x3(x, weight, bias), F.conv2d(x, weight, bias, padding=1), rtol=0,
                                   atol=0)


def test_traces_under_torch_compile():
    """The routing (shapes, dtype, SDCORE_WINOGRAD) traces under torch.compile(fullgraph=True) and the op runs
    through its fake kernel to the same values as eager."""
    torch._dynamo.reset()
    block = ResnetBlock(128, 128, 32, 1e-5).eval()
    x = torch.randn(1, 128, 32, 32)
    with torch.no_grad(), sdcore.use_backend("kernels"):
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), eager)
        assert _conv_ops(lambda: compiled(x))[0] == 2


def test_module_off_the_cpu_is_nn_conv2d(monkeypatch):
    """Off the CPU, Conv3x3 is nn.Conv2d's forward and never enters sdcore.ops.conv3x3 (its checks and routing
    would be host time a launch-bound GPU step pays per convolution); the meta device stands in for a GPU."""
    def refuse(*args, **kwargs):
        raise AssertionError("ops.conv3x3 called for a meta tensor")

    monkeypatch.setattr(ops, "conv3x3", refuse)
    conv = Conv3x3(8, 16).to("meta")
    assert conv(torch.empty(2, 8, 5, 7, device="meta")).shape == (2, 16, 5, 7)
    with pytest.raises(AssertionError, match="ops.conv3x3 called"):
        Conv3x3(8, 16)(torch.randn(1, 8, 4, 4))  # the CPU path does go through it
