"""torch.library.opcheck on every op (schema, fake/meta kernel, dispatch), and one torch.compile."""
import pytest
import torch

from sdcore import ops, schedulers

from conftest import devices


def _attention_samples(device):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    yield (mk(2, 3, 17, 40), mk(2, 3, 77, 40), mk(2, 3, 77, 40), False, None)
    yield (mk(1, 2, 77, 64), mk(1, 2, 77, 64), mk(1, 2, 77, 64), True, 0.2)
    yield (mk(1, 1, 33, 512).half(), mk(1, 1, 20, 512).half(), mk(1, 1, 20, 512).half(), False, None)
    q = mk(1, 9, 2, 16).transpose(1, 2)
    yield (q, q, q, False, None)


def _group_norm_samples(device):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    yield (mk(2, 32, 8, 8), 8, mk(32), mk(32), 1e-5, True)
    yield (mk(2, 32, 8, 8).to(memory_format=torch.channels_last), 4, None, None, 1e-6, False)
    yield (mk(1, 16, 5, 7).bfloat16(), 16, mk(16).bfloat16(), None, 1e-5, True)


def _geglu_samples(device):
    g = torch.Generator().manual_seed(4)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    yield (mk(2, 9, 64), mk(64))
    yield (mk(3, 40)[:, :10].half(), None)  # rows 40 apart
    yield (mk(1, 7, 6).bfloat16(), mk(6).bfloat16())


def _linear_add_samples(device):
    g = torch.Generator().manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    yield (mk(2, 9, 64), mk(32, 64), mk(32), mk(2, 9, 32))
    yield (mk(3, 40)[:, :24].half(), mk(8, 24).half(), None, mk(3, 8).half())  # x's rows 40 apart
    yield (mk(1, 7, 6).bfloat16(), mk(5, 6).bfloat16(), mk(5).bfloat16(), mk(5, 7).bfloat16().t()[None])


def _conv3x3_samples(device):
    # The CPU kernel only: on CUDA, sdcore.ops.conv3x3 runs cuDNN's convolution.
    g = torch.Generator().manual_seed(6)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    yield (mk(2, 16, 5, 7), mk(8, 16, 3, 3), mk(8))
    yield (mk(1, 3, 4, 9)[..., 1:8], mk(2, 3, 3, 3), None)  # a strided x


def _step_samples(device):
    g = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    c = schedulers.dpmpp_2m(4.0, 3.0, 5.0)
    yield (mk(2, 4, 8, 8), mk(1, 4, 8, 8), c.packed(), [mk(1, 4, 8, 8)], list(c.history), None, 7.5, True)
    c = schedulers.ddim(0.3, 0.5, eta=1.0)
    yield (mk(1, 4, 8, 8), mk(1, 4, 8, 8), c.packed(), [], [], mk(1, 4, 8, 8), None, False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op,samples", [
    ("attention", _attention_samples), ("group_norm", _group_norm_samples), ("geglu", _geglu_samples),
    ("linear_add", _linear_add_samples), ("scheduler_step", _step_samples), ("conv3x3", _conv3x3_samples)])
def test_opcheck(device, op, samples):
    if op == "conv3x3" and device != "cpu":
        pytest.skip("conv3x3 is a CPU kernel; sdcore.ops.conv3x3 runs cuDNN's convolution on CUDA")
    for args in samples(device):
        torch.library.opcheck(getattr(torch.ops.sdcore, op).default, args)


def _block(x, w, b, q, k, v, mo, sample):
    """A UNet-ish slice: GroupNorm+SiLU, attention with its out-projection adding the residual q, a scheduler
    step."""
    h = ops.group_norm(x, 8, w, b, silu=True)
    a = ops.attention(q, k, v)
    a = ops.linear_add(a, k[0, 0, :40], None, q)
    out, x0 = ops.scheduler_step(mo, sample, schedulers.ddim(0.3, 0.5), guidance_scale=7.5)
    return h.sum() + a.sum(), out, x0


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    args = (mk(2, 32, 8, 8), mk(32), mk(32), mk(1, 2, 33, 40), mk(1, 2, 77, 40), mk(1, 2, 77, 40),
            mk(2, 4, 8, 8), mk(1, 4, 8, 8))
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    want = _block(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_inductor_compiles_a_tiny_unet_fullgraph():
    """torch.compile(unet, fullgraph=True) with the default backend (inductor: generated C++ on the CPU) runs
    sdcore's ops with no graph break and matches eager. The scale is the error of the compiled fp32 graph
    (inductor reorders and fuses the elementwise math around the ops), far below any visible difference."""
    from sdcore import embedded

    torch._dynamo.reset()
    pipe = embedded.build("tiny")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        want = pipe.unet(x, t, text)
        compiled = torch.compile(pipe.unet, fullgraph=True)
        got = compiled(x, t, text)
        again = compiled(x * 0.5, t - 100, text)  # the same graph, other values: no recompile needed
        want_again = pipe.unet(x * 0.5, t - 100, text)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want_again, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, again)
