"""Kernel-vs-reference validation of every op over the shapes Stable Diffusion runs (``sdcore validate``).

Each case runs the op on the ``kernels`` backend, on the ``torch`` backend, and on the ``reference``
backend in float64, and reports max |error| and max |error| / max |reference|. Tolerance: float32 must
be within 1e-5 relative of float64; float16/bfloat16 within 2x the error of the torch backend in the same
precision (with that precision's epsilon as a floor, for cases where torch happens to be exact).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from . import ops, reference, schedulers
from ._backend import use_backend

FP32_TOL = 1e-5


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    run: Callable[[str, torch.dtype], torch.Tensor]  # (backend, dtype) -> output in float64
    ref: Callable[[], torch.Tensor]  # float64 reference


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool


def _attention_case(b, h, n, m, d, causal, label, *, device, gen) -> Case:
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, m, d, generator=gen)
    v = torch.randn(b, h, m, d, generator=gen)
    # The float64 reference materializes N x M scores: compare the first batch entry and up to two heads
    # (every head runs the same code; the kernels still compute the full tensor).
    hs = min(h, 2)

    def run(backend, dtype):
        with use_backend(backend):
            out = ops.attention(*(t.to(device, dtype) for t in (q, k, v)), causal=causal)
        return out[:1, :hs].double().cpu()

    def ref():
        return reference.attention(q[:1, :hs].double(), k[:1, :hs].double(), v[:1, :hs].double(), causal=causal)

    shape = f"B{b} H{h} N{n} M{m} D{d}" + (" causal" if causal else "")
    return Case("attention", f"{label}: {shape}", run, ref)


def _group_norm_case(shape, groups, eps, silu, channels_last, label, *, device, gen) -> Case:
    x = torch.randn(*shape, generator=gen) * 2 + 0.5
    w = torch.randn(shape[1], generator=gen)
    b = torch.randn(shape[1], generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run(backend, dtype):
        xd = x.to(device, dtype).contiguous(memory_format=fmt)
        with use_backend(backend):
            out = ops.group_norm(xd, groups, w.to(device, dtype), b.to(device, dtype), eps, silu=silu)
        # PyTorch's own CUDA group_norm returns NCHW for a channels_last input; only ours promise the format.
        if backend != "torch" and not out.is_contiguous(memory_format=fmt):
            raise AssertionError(f"group_norm changed the memory format to strides {out.stride()}")
        return out.double().cpu()

    def ref():
        return reference.group_norm(x.double(), groups, w.double(), b.double(), eps, silu=silu)

    desc = "x".join(map(str, shape)) + f" G{groups}" + (" +SiLU" if silu else "") + (" NHWC" if channels_last else "")
    return Case("group_norm", f"{label}: {desc}", run, ref)


def _geglu_case(b, n, d, label, *, device, gen) -> Case:
    x = torch.randn(b, n, d, generator=gen)
    w = torch.randn(8 * d, d, generator=gen) * d ** -0.5
    bias = torch.randn(8 * d, generator=gen)

    def run(backend, dtype):
        with use_backend(backend):
            out = ops.geglu(x.to(device, dtype), w.to(device, dtype), bias.to(device, dtype))
        return out.double().cpu()

    def ref():
        return reference.geglu(x.double(), w.double(), bias.double())

    return Case("geglu", f"{label}: {b}x{n}x{d} -> {4 * d}", run, ref)


def _linear_add_case(b, n, d_in, d_out, label, *, device, gen) -> Case:
    x = torch.randn(b, n, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5
    bias, residual = torch.randn(d_out, generator=gen), torch.randn(b, n, d_out, generator=gen)

    def run(backend, dtype):
        with use_backend(backend):
            out = ops.linear_add(x.to(device, dtype), w.to(device, dtype), bias.to(device, dtype),
                                 residual.to(device, dtype))
        return out.double().cpu()

    def ref():
        return reference.linear_add(x.double(), w.double(), bias.double(), residual.double())

    return Case("linear_add", f"{label}: {b}x{n}x{d_in} -> {d_out} + residual", run, ref)


def _conv3x3_case(b, cin, cout, hw, label, *, device, gen) -> Case:
    x = torch.randn(b, cin, hw, hw, generator=gen)
    w = torch.randn(cout, cin, 3, 3, generator=gen) * (9 * cin) ** -0.5
    bias = torch.randn(cout, generator=gen)

    def run(backend, dtype):
        with use_backend(backend):
            out = ops.conv3x3(x.to(device, dtype), w.to(device, dtype), bias.to(device, dtype))
        return out.double().cpu()

    def ref():
        return reference.conv3x3(x.double(), w.double(), bias.double())

    return Case("conv3x3", f"{label}: {b}x{cin}x{hw}x{hw} -> {cout}", run, ref)


def _step_case(name, coeffs, batch, hw, guidance, *, device, gen) -> Case:
    shape = (batch, 4, hw, hw)
    mo = torch.randn((2 * batch,) + shape[1:] if guidance else shape, generator=gen)
    x = torch.randn(shape, generator=gen) * 3
    history = [torch.randn(shape, generator=gen) for _ in coeffs.history]
    noise = torch.randn(shape, generator=gen) if coeffs.next_from_noise else None

    def run(backend, dtype):
        cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        with use_backend(backend):
            out, state = ops.scheduler_step(cast(mo), cast(x), coeffs, history=[cast(h) for h in history],
                                            noise=cast(noise), guidance_scale=guidance)
        return torch.cat([out.double().cpu().flatten(), state.double().cpu().flatten()])

    def ref():
        out, state = reference.scheduler_step(mo.double(), x.double(), coeffs, history=[h.double() for h in history],
                                              noise=None if noise is None else noise.double(),
                                              guidance_scale=guidance)
        return torch.cat([out.flatten(), state.flatten()])

    return Case("scheduler_step", f"{name}: {batch}x4x{hw}x{hw}" + (" CFG" if guidance else ""), run, ref)


def sd_cases(device: str, quick: bool = False, seed: int = 0) -> list[Case]:
    """The SD shapes (docs: shared sd_shapes.md). ``quick`` drops the largest VAE tensors."""
    gen = torch.Generator().manual_seed(seed)
    a = lambda *args: _attention_case(*args, device=device, gen=gen)  # noqa: E731
    cases = [
        a(2, 8, 4096, 4096, 40, False, "SD1 down0 self"),
        a(2, 8, 4096, 77, 40, False, "SD1 down0 cross"),
        a(2, 8, 1024, 1024, 80, False, "SD1 down1 self"),
        a(2, 8, 1024, 77, 80, False, "SD1 down1 cross"),
        a(2, 8, 256, 256, 160, False, "SD1 down2 self"),
        a(2, 8, 256, 77, 160, False, "SD1 down2 cross"),
        a(2, 8, 64, 77, 160, False, "SD1 mid cross"),
        a(2, 5, 4096, 4096, 64, False, "SD2 down0 self"),
        a(2, 20, 256, 77, 64, False, "SD2 down2 cross"),
        a(1, 1, 4096, 4096, 512, False, "VAE mid"),
        a(2, 12, 77, 77, 64, True, "CLIP-L"),
        a(2, 16, 77, 77, 64, True, "OpenCLIP-H"),
    ]
    g = lambda *args: _group_norm_case(*args, device=device, gen=gen)  # noqa: E731
    cases += [
        g((2, 320, 64, 64), 32, 1e-5, True, False, "UNet"),
        g((2, 320, 64, 64), 32, 1e-5, True, True, "UNet"),
        g((2, 320, 64, 64), 32, 1e-6, False, False, "UNet proj_in"),
        g((2, 640, 32, 32), 32, 1e-5, True, False, "UNet"),
        g((2, 960, 32, 32), 32, 1e-5, True, True, "UNet"),
        g((2, 1280, 16, 16), 32, 1e-5, True, False, "UNet"),
        g((2, 2560, 8, 8), 32, 1e-5, True, False, "UNet"),
        g((2, 1920, 16, 16), 32, 1e-5, True, True, "UNet"),
        g((1, 512, 64, 64), 32, 1e-6, True, False, "VAE"),
        g((1, 512, 128, 128), 32, 1e-6, True, True, "VAE"),
    ]
    if not quick:
        cases += [g((1, 256, 256, 256), 32, 1e-6, True, False, "VAE"),
                  g((1, 128, 512, 512), 32, 1e-6, True, True, "VAE")]
    f = lambda *args: _geglu_case(*args, device=device, gen=gen)  # noqa: E731
    cases += [f(2, 4096, 320, "SD1 down0 FF"), f(2, 256, 1280, "SD1 down2 FF"), f(2, 1024, 640, "SD2 down1 FF")]
    r = lambda *args: _linear_add_case(*args, device=device, gen=gen)  # noqa: E731
    cases += [r(2, 4096, 320, 320, "SD1 down0 to_out"), r(2, 4096, 1280, 320, "SD1 down0 FF out"),
              r(2, 256, 5120, 1280, "SD1 down2 FF out")]
    c = lambda *args: _conv3x3_case(*args, device=device, gen=gen)  # noqa: E731
    cases += [c(2, 4, 320, 64, "SD1 conv_in"), c(2, 320, 320, 64, "SD1 down0"), c(2, 960, 640, 32, "SD1 up1"),
              c(2, 1280, 1280, 16, "SD1 down2"), c(2, 2560, 1280, 8, "SD1 up0"), c(2, 2560, 1280, 4, "SD1 256^2 up0"),
              c(2, 320, 4, 64, "SD1 conv_out"), c(1, 512, 512, 64, "VAE mid")]
    if not quick:
        cases += [c(1, 256, 256, 256, "VAE up2")]
    s = lambda *args: _step_case(*args, device=device, gen=gen)  # noqa: E731
    a_t, a_prev = 0.3, 0.45
    cases += [
        s("DDIM", schedulers.ddim(a_t, a_prev), 1, 64, 7.5),
        s("DDIM eta=1 clip", schedulers.ddim(a_t, a_prev, eta=1.0, clip_sample_range=1.0), 2, 64, 5.0),
        s("Euler v-pred", schedulers.euler(4.0, 3.2, prediction_type="v_prediction"), 1, 96, 7.5),
        s("Euler a", schedulers.euler_ancestral(4.0, 3.2), 1, 64, 7.5),
        s("DPM++2M", schedulers.dpmpp_2m(4.0, 3.2, 5.1), 2, 64, 7.5),
        s("DPM++2M no CFG", schedulers.dpmpp_2m(4.0, 3.2, 5.1), 1, 64, None),
    ]
    return cases


def evaluate(case: Case, dtype: torch.dtype, ref: torch.Tensor) -> Result:
    out = case.run("kernels", dtype)
    scale = ref.abs().max().item() or 1.0
    err = (out - ref).abs()
    max_abs = err.max().item() if torch.isfinite(out).all() else math.inf
    if dtype == torch.float32:
        tol = FP32_TOL
    else:
        torch_err = (case.run("torch", dtype) - ref).abs().max().item() / scale
        tol = max(2.0 * torch_err, torch.finfo(dtype).eps)
    rel = max_abs / scale
    return Result(case.op, case.shape, str(dtype).replace("torch.", ""), max_abs, rel, tol, rel <= tol)


def run(device: str = "cpu", dtypes=(torch.float32,), quick: bool = False, out=print) -> list[Result]:
    results = []
    header = f"{'op':<15} {'shape':<46} {'dtype':<9} {'max abs':>10} {'max rel':>10} {'tol':>9}  result"
    out(header)
    out("-" * len(header))
    for case in sd_cases(device, quick=quick):
        ref = case.ref()
        for dtype in dtypes:
            r = evaluate(case, dtype, ref)
            results.append(r)
            out(f"{r.op:<15} {r.shape:<46} {r.dtype:<9} {r.max_abs:>10.3e} {r.max_rel:>10.3e} {r.tolerance:>9.1e}  "
                f"{'PASS' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in results)
    out(f"{len(results) - failed} passed, {failed} failed")
    return results
