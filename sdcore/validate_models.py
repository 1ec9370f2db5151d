"""Component-level validation (``sdcore validate --model ... | --arch ...``): the user's own model, on their own
machine, through the kernels backend and through the reference backend, component by component.

Both paths run the same weights in the same dtype on the same inputs; the convolutions and linears are the
same PyTorch calls in both, so the difference is what sdcore's ops (attention, GroupNorm+SiLU, the fused step)
change. Components: the text encoder (prompt + negative prompt embeddings), one UNet step (CFG batch of 2),
the VAE decode, and a short whole generation from a fixed seed (its image compared by PSNR).

Tolerances, with rel = max |kernels - reference| / max |reference|:
- float32: rel <= 1e-4 for each component; the image's PSNR >= 60 dB.
- float16 / bfloat16: the kernels must be within 2x of what PyTorch's own ops (the torch backend) differ from
  the reference in the same precision: rel <= max(2 * rel_torch, 4 * eps(dtype)), and the image's PSNR >=
  PSNR_torch - 6.02 dB (twice the RMS error); each torch run happens only for these dtypes.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import torch

from ._backend import use_backend

FP32_REL, FP32_PSNR = 1e-4, 60.0
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on the moon", "blurry, low quality"

# Test hook: component name -> function applied to the kernels backend's output of that component, so a test
# can show that a wrong kernel result fails validation.
PERTURB: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


@dataclasses.dataclass
class ComponentResult:
    component: str
    dtype: str
    max_abs: float
    max_rel: float
    psnr: float | None  # images only
    tolerance: str
    passed: bool


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB (inf when identical)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if not torch.isfinite(out).all():
        return math.inf, math.inf
    max_abs = (out.double() - ref.double()).abs().max().item()
    return max_abs, max_abs / (ref.double().abs().max().item() or 1.0)


def _components(pipe, size: tuple[int, int], steps: int):
    """name -> function() -> output tensor, on fixed inputs (drawn once, on the CPU)."""
    width, height = size
    f = pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    dev, dtype = pipe.device, pipe.dtype
    latents = torch.randn(2, pipe.unet.config.in_channels, height // f, width // f, generator=g).to(dev, dtype)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dev, dtype)
    z = torch.randn(1, pipe.unet.config.out_channels, height // f, width // f, generator=g).to(dev, dtype)
    pipe.scheduler.set_timesteps(steps, device=dev)
    t = pipe.scheduler.timesteps[len(pipe.scheduler.timesteps) // 2]
    unet_kwargs, call_kwargs = {}, dict(height=height, width=width)
    cfg = pipe.unet.config
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + micro-conditioning time ids
        ids = [float(height), float(width), 0.0, 0.0] + ([6.0] if pipe.requires_aesthetics_score else
                                                         [float(height), float(width)])
        pooled = cfg.projection_class_embeddings_input_dim - len(ids) * cfg.addition_time_embed_dim
        unet_kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g).to(dev, dtype),
                                            "time_ids": torch.tensor([ids] * 2, device=dev, dtype=dtype)}
    if "strength" in inspect.signature(type(pipe).__call__).parameters:  # the SDXL refiner: image to image
        picture = torch.rand(1, 3, height, width, generator=g)
        call_kwargs = dict(image=picture, strength=0.5)

    def text_encoder():
        out = pipe.encode_prompt(PROMPT, negative_prompt=NEGATIVE)
        return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out  # SDXL: + pooled

    return {
        "text_encoder": text_encoder,
        "unet": lambda: pipe.unet(latents, t, text, **unet_kwargs),
        "vae_decode": lambda: pipe.vae.decode(z.to(next(pipe.vae.parameters()).dtype)),
        "image": lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, seed=0, output_type="pt",
                              progress=False, **call_kwargs).images,
    }


def _run(fn, backend: str, component: str) -> torch.Tensor:
    with torch.no_grad(), use_backend(backend):
        out = fn()
    if backend == "kernels" and component in PERTURB:
        out = PERTURB[component](out)
    return out.float().cpu()


def run(pipe, size: tuple[int, int] | None = None, steps: int = 4, out=print) -> list[ComponentResult]:
    """Validates ``pipe`` component by component; prints a table and returns the rows."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = size or (native, native)
    dtype = pipe.dtype
    name = str(dtype).replace("torch.", "")
    header = f"{'component':<13} {'dtype':<9} {'max abs':>10} {'max rel':>10} {'PSNR dB':>8}  {'tolerance':<26} result"
    out(f"# {size[0]}x{size[1]}, {steps} steps, device {pipe.device}: kernels vs reference backend")
    out(header)
    out("-" * len(header))
    results = []
    for component, fn in _components(pipe, size, steps).items():
        ref = _run(fn, "reference", component)
        got = _run(fn, "kernels", component)
        max_abs, rel = _errors(got, ref)
        psnr = _psnr(got, ref) if component == "image" else None
        if dtype == torch.float32:
            if psnr is None:
                tol, passed = f"rel <= {FP32_REL:.0e}", rel <= FP32_REL
            else:
                tol, passed = f"PSNR >= {FP32_PSNR:.0f}", psnr >= FP32_PSNR
        else:
            base = _run(fn, "torch", component)
            if psnr is None:
                bound = max(2 * _errors(base, ref)[1], 4 * torch.finfo(dtype).eps)
                tol, passed = f"rel <= {bound:.2e} (2x torch)", rel <= bound
            else:
                bound = _psnr(base, ref) - 20 * math.log10(2)
                tol, passed = f"PSNR >= {bound:.1f} (torch - 6)", psnr >= bound
        r = ComponentResult(component, name, max_abs, rel, psnr, tol, passed and math.isfinite(rel))
        results.append(r)
        shown = "-" if psnr is None else ("inf" if math.isinf(psnr) else f"{psnr:.1f}")
        out(f"{component:<13} {name:<9} {max_abs:>10.3e} {rel:>10.3e} {shown:>8}  {tol:<26} "
            f"{'PASS' if r.passed else 'FAIL'}")
    failed = [r.component for r in results if not r.passed]
    out(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return results
