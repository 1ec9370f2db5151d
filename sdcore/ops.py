"""sdcore's ops: one public function per op, dispatched to the current backend (see
:func:`sdcore.use_backend`). The ``kernels`` backend calls the compiled ``torch.ops.sdcore.*`` ops, which
have fake (meta) implementations here so they trace under ``torch.compile`` and CUDA graphs."""
from __future__ import annotations

import numbers
import os

import torch
import torch.nn.functional as F

from . import _backend, _ext, reference
from .step import StepCoefficients

__all__ = ["attention", "conv3x3", "geglu", "group_norm", "linear_add", "scheduler_step", "kernels_reason"]


def kernels_reason(*tensors: torch.Tensor) -> str | None:
    """None when the ``kernels`` backend can serve these tensors, else the reason it can't."""
    error = _ext.load_error()
    if error is not None:
        return error
    t = tensors[0]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return "the kernels are inference-only and an input requires grad"
    if t.device.type == "cpu":
        return None
    if t.device.type == "cuda":
        return _ext.cuda_device_reason(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return f"no sdcore kernels for device type {t.device.type!r}"


def _type_name(value) -> str:
    return type(value).__name__


def _check_tensor(op: str, name: str, value, *, optional: bool = False) -> None:
    # Checked before dispatch so every backend says the same thing: otherwise the kernels backend failed with
    # an AttributeError from kernels_reason and the torch backend with whatever SDPA/group_norm said.
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return
    expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
    raise TypeError(f"sdcore.{op}: {name} must be {expected}, got {_type_name(value)}")


def _check_real(op: str, name: str, value, *, optional: bool = False) -> None:
    # bool is an int to Python, but True as a scale or eps is a bug, not a number. A float is the usual case,
    # tested first: isinstance against the numbers ABCs costs about a microsecond per op call.
    if type(value) is float or (optional and value is None):
        return
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    expected = "a real number or None" if optional else "a real number"
    raise TypeError(f"sdcore.{op}: {name} must be {expected}, got {_type_name(value)}")


def _pick(op: str, *tensors) -> str:
    backend = _backend.get_backend()
    if backend == "kernels":
        reason = kernels_reason(*tensors)
        if reason is not None:
            _backend.note_fallback(op, reason)
            return "torch"
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head attention softmax(scale * q k^T) v without materializing the N x M scores.

    q: [B, H, N, D]; k, v: [B, H, M, D]; returns [B, H, N, D], which the kernels lay out in memory as
    [B, N, H, D] so that ``out.transpose(1, 2).flatten(2)`` ([B, N, H*D]) is a view. ``scale`` defaults to
    1/sqrt(D). ``causal`` masks key j > query i (top-left aligned, like SDPA's is_causal).
    float32/float16/bfloat16 with float32 accumulation; D up to 512.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor("attention", name, t)
    if not isinstance(causal, bool):
        raise TypeError(f"sdcore.attention: causal must be a bool, got {_type_name(causal)}")
    _check_real("attention", "scale", scale, optional=True)
    backend = _pick("attention", q, k, v)
    if backend == "kernels":
        return torch.ops.sdcore.attention(q, k, v, causal, scale)
    if backend == "torch":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return reference.attention(q, k, v, causal=causal, scale=scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, silu: bool = False) -> torch.Tensor:
    """GroupNorm over [B, C, *spatial] with float32 statistics, optionally followed by SiLU in the same
    pass. NCHW and channels_last inputs; the output keeps the input's memory format."""
    _check_tensor("group_norm", "x", x)
    _check_tensor("group_norm", "weight", weight, optional=True)
    _check_tensor("group_norm", "bias", bias, optional=True)
    if type(num_groups) is not int:
        if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool):
            raise TypeError(f"sdcore.group_norm: num_groups must be an int, got {_type_name(num_groups)}")
        num_groups = int(num_groups)  # numpy integers pass the check; the op schema wants Python's
    _check_real("group_norm", "eps", eps)
    eps = float(eps)
    backend = _pick("group_norm", x, weight, bias)
    if backend == "kernels":
        return torch.ops.sdcore.group_norm(x, num_groups, weight, bias, eps, silu)
    if backend == "torch":
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y
    return reference.group_norm(x, num_groups, weight, bias, eps, silu=silu)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 convolution with stride 1 and padding 1, ``F.conv2d(x, weight, bias, padding=1)``: every 3x3
    convolution of the SD UNet and VAE but the downsamplers'. x: [B, C, H, W]; weight: [Co, C, 3, 3];
    bias: [Co]. The kernels backend runs float32 NCHW inputs on the CPU by Winograd's F(2x2, 3x3)
    (``torch.ops.sdcore.conv3x3``: 2.25x fewer multiplies than a direct convolution; its RMS error against
    float64 is 0.84-1.51x that of PyTorch's float32 convolution on an Intel Xeon, and the tests hold it to 2x)
    where that is faster, and the smallest images of the widest layers (the 4x4 level of a 256^2 UNet) by one
    GEMM over their 3x3 patches (``_conv3x3_route``).
    Everything else (CUDA, where cuDNN picks its own algorithm; channels_last; half types; thin or small
    layers) and ``SDCORE_WINOGRAD=0`` run ``F.conv2d``, as the torch backend does."""
    _check_tensor("conv3x3", "x", x)
    _check_tensor("conv3x3", "weight", weight)
    _check_tensor("conv3x3", "bias", bias, optional=True)
    if x.dim() != 4:
        raise ValueError(f"sdcore.conv3x3: x must be 4-D [B, C, H, W], got shape {list(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"sdcore.conv3x3: weight must be [out_channels, {x.shape[1]}, 3, 3], got shape "
                         f"{list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"sdcore.conv3x3: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    backend = _pick("conv3x3", x, weight, bias)
    if backend == "kernels" and os.environ.get("SDCORE_WINOGRAD") != "0":
        route = _conv3x3_route(x, weight, bias)
        if route == "winograd":
            return torch.ops.sdcore.conv3x3(x, weight, bias)
        if route == "gemm":
            return _conv3x3_gemm(x, weight, bias)
    if backend == "reference":
        return reference.conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


# Where Winograd beats oneDNN's direct convolution on the CPU (bench/ops.py --ops conv3x3, docs/PERF.md): from
# WINOGRAD_MIN_CHANNELS input and WINOGRAD_MIN_OUT_CHANNELS output channels (thinner GEMMs lose: the 4-channel
# conv_in, 64 channels, the 4- or 3-channel conv_out) and WINOGRAD_MIN_PIXELS output pixels (B*H*W) to
# amortize the per-call filter transform; the layers of at least 1280x1280 filters win from 64 pixels, as
# oneDNN reorders their 59 MB of weights on every call.
WINOGRAD_MIN_CHANNELS = 96
WINOGRAD_MIN_OUT_CHANNELS = 128
WINOGRAD_MIN_PIXELS = 512
WINOGRAD_MIN_PIXELS_WIDE = 64


def _conv3x3_route(x, weight, bias) -> str | None:
    """"winograd", "gemm" or None (F.conv2d) for a conv3x3 on the kernels backend. Below 64 pixels, Winograd
    loses on the wide layers: its RMS error reaches ~3x PyTorch's on 4x4 images (most of a tile is padding), and
    MKL's GEMMs of under ~16 tiles take a slow small-matrix path. oneDNN is no better there: with two or more
    images it runs its direct kernel, weight reorder included: 56 and 125 ms for the 4x4 level's layers of a
    256^2 UNet on a 2-core Zen 3, where one GEMM over the 3x3 patches ("gemm", _conv3x3_gemm) takes 19 and 42 ms,
    with 7-9x less RMS error than oneDNN's against float64 (docs/PERF.md)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.is_contiguous()
            and x.shape[1] >= WINOGRAD_MIN_CHANNELS and weight.shape[0] >= WINOGRAD_MIN_OUT_CHANNELS):
        return None
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    if pixels == 0:  # nothing to compute, or an empty side: F.conv2d's own result or message
        return None
    if x.shape[1] * weight.shape[0] >= 1280 * 1280:
        return "winograd" if pixels >= WINOGRAD_MIN_PIXELS_WIDE else "gemm"
    return "winograd" if pixels >= WINOGRAD_MIN_PIXELS else None


def _conv3x3_gemm(x, weight, bias):
    """The direct convolution as one GEMM: the [B*H*W, 9C] matrix of every output's 3x3 input patch (zero
    padded; F.unfold, in the (channel, ky, kx) order of the weight's own layout) times the [9C, Co] weights, with
    the bias added by addmm. For small images only: the patch matrix is 9x the input."""
    b, c, h, w = x.shape
    co = weight.shape[0]
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(b * h * w, 9 * c)
    flat = weight.reshape(co, 9 * c).t()
    out = torch.addmm(bias, patches, flat) if bias is not None else patches @ flat
    return out.view(b, h * w, co).transpose(1, 2).contiguous().view(b, co, h, w)  # NCHW, as F.conv2d returns


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The GEGLU layer of the UNet's feed-forward (Shazeer 2020): h = x @ weight.T + bias, split along its last
    dim into [value, gate], gives value * gelu(gate) with the exact (erf) GELU. x: [..., in]; weight: [2F, in];
    bias: [2F]; returns [..., F]. The kernels backend runs the GEMM without its bias, then the bias, the GELU
    and the product in one pass (``torch.ops.sdcore.geglu``) instead of three."""
    _check_tensor("geglu", "x", x)
    _check_tensor("geglu", "weight", weight)
    _check_tensor("geglu", "bias", bias, optional=True)
    if weight.dim() != 2 or weight.shape[0] % 2 != 0:
        raise ValueError(f"sdcore.geglu: weight must be [2F, in] with an even number of rows (value, then gate), "
                         f"got shape {list(weight.shape)}")
    backend = _pick("geglu", x, weight, bias)
    if backend == "kernels":
        return torch.ops.sdcore.geglu(F.linear(x, weight), bias)
    if backend == "torch":
        value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
        return value * F.gelu(gate)
    return reference.geglu(x, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               residual: torch.Tensor) -> torch.Tensor:
    """A linear layer added to a residual: x @ weight.T + bias + residual, the last step of every attention,
    feed-forward and spatial transformer in the UNet. x: [..., in]; weight: [out, in]; bias: [out] or None;
    residual: [..., out]; returns a new dense [..., out] tensor. On CUDA the kernels backend runs one cuBLASLt
    GEMM whose epilogue adds the bias and reads the residual as its C, rounding once, where the layer and a
    separate add round twice and write an intermediate; on the CPU, residual + bias in one pass and the GEMM
    accumulating into it."""
    _check_tensor("linear_add", "x", x)
    _check_tensor("linear_add", "weight", weight)
    _check_tensor("linear_add", "bias", bias, optional=True)
    _check_tensor("linear_add", "residual", residual)
    # Checked for every backend: the torch one would otherwise broadcast a residual or bias of the wrong shape.
    if x.dim() == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"sdcore.linear_add: weight must be [out_features, in_features] with in_features the last "
                         f"dim of x, got weight {list(weight.shape)} for x {list(x.shape)}")
    out_shape = [*x.shape[:-1], weight.shape[0]]
    if bias is not None and list(bias.shape) != out_shape[-1:]:
        raise ValueError(f"sdcore.linear_add: bias must have shape {out_shape[-1:]}, got {list(bias.shape)}")
    if list(residual.shape) != out_shape:
        raise ValueError(f"sdcore.linear_add: residual must have shape {out_shape} (x's with the last dim "
                         f"out_features), got {list(residual.shape)}")
    backend = _pick("linear_add", x, weight, bias, residual)
    if backend == "kernels":
        return torch.ops.sdcore.linear_add(x, weight, bias, residual)
    if backend == "torch":
        return F.linear(x, weight, bias) + residual
    return reference.linear_add(x, weight, bias, residual)


def scheduler_step(model_output: torch.Tensor, sample: torch.Tensor, coeffs: StepCoefficients, *,
                   history=(), noise: torch.Tensor | None = None, guidance_scale: float | None = None,
                   return_state: bool = True):
    """One fused denoising step (see :mod:`sdcore.step`): classifier-free guidance on the [2B, ...] UNet
    output when ``guidance_scale`` is given (uncond first), the prediction-type conversion and the
    update. Returns ``(next_sample, state)``; ``state`` is None when ``return_state`` is False."""
    _check_tensor("scheduler_step", "model_output", model_output)
    _check_tensor("scheduler_step", "sample", sample)
    _check_tensor("scheduler_step", "noise", noise, optional=True)
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"sdcore.scheduler_step: coeffs must be a sdcore.StepCoefficients, got {_type_name(coeffs)}")
    # A lone tensor is iterable too (over its first dim): reject it rather than read it as a list of tensors.
    if isinstance(history, torch.Tensor) or not hasattr(history, "__iter__"):
        raise TypeError(f"sdcore.scheduler_step: history must be a sequence of torch.Tensor, got {_type_name(history)}")
    history = tuple(history)
    for i, h in enumerate(history):
        _check_tensor("scheduler_step", f"history[{i}]", h)
    _check_real("scheduler_step", "guidance_scale", guidance_scale, optional=True)
    if len(history) != len(coeffs.history):
        raise ValueError(f"scheduler_step: {len(history)} history tensors for {len(coeffs.history)} "
                         "history coefficients")
    backend = _pick("scheduler_step", sample, model_output, *history)
    if backend == "kernels":
        out, state = torch.ops.sdcore.scheduler_step(model_output, sample, coeffs.packed(), list(history),
                                                     list(coeffs.history), noise, guidance_scale, return_state)
        return out, (state if return_state else None)
    if backend == "torch":
        return _torch_step(model_output, sample, coeffs, history, noise, guidance_scale, return_state)
    return reference.scheduler_step(model_output, sample, coeffs, history=history, noise=noise,
                                    guidance_scale=guidance_scale, return_state=return_state)


def _torch_step(model_output, sample, c, history, noise, guidance_scale, return_state):
    """The unfused chain a diffusers pipeline + scheduler runs: one torch op per term."""
    m = model_output
    if guidance_scale is not None:
        uncond, cond = m.chunk(2)
        m = uncond + guidance_scale * (cond - uncond)
    x0 = c.x0_from_sample * sample + c.x0_from_output * m
    if c.clip > 0:
        x0 = x0.clamp(-c.clip, c.clip)
    out = c.next_from_sample * sample + c.next_from_output * m + c.next_from_x0 * x0
    for weight, h in zip(c.history, history):
        out = out + weight * h
    if c.next_from_noise != 0:
        out = out + c.next_from_noise * noise
    state = None
    if return_state:
        state = c.state_from_sample * sample + c.state_from_output * m + c.state_from_x0 * x0
    return out, state


def _check_devices(op: str, **tensors) -> None:
    # A mix of devices can dispatch to the fake kernel (meta wins), which must not hand back a silent result.
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(f"sdcore.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                               "all inputs must be on one device")


if _ext.load_error() is None:

    @torch.library.register_fake("sdcore::attention")
    def _attention_fake(q, k, v, causal=False, scale=None):
        _check_devices("attention", q=q, k=k, v=v)
        b, h, n, d = q.shape
        return q.new_empty(b, n, h, d).permute(0, 2, 1, 3)  # the kernels' output layout (see checks.cpp)

    @torch.library.register_fake("sdcore::group_norm")
    def _group_norm_fake(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
        _check_devices("group_norm", x=x, weight=weight, bias=bias)
        return torch.empty_like(x, memory_format=reference.memory_format_of(x))

    @torch.library.register_fake("sdcore::conv3x3")
    def _conv3x3_fake(x, weight, bias=None):
        _check_devices("conv3x3", x=x, weight=weight, bias=bias)
        torch._check(x.dim() == 4, lambda: f"sdcore.conv3x3: x must be 4-D [B, C, H, W], got shape {list(x.shape)}")
        torch._check(weight.dim() == 4 and weight.shape[1] == x.shape[1] and weight.shape[2] == 3
                     and weight.shape[3] == 3,
                     lambda: f"sdcore.conv3x3: weight must be [out_channels, {x.shape[1]}, 3, 3], got shape "
                             f"{list(weight.shape)}")
        torch._check(bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]),
                     lambda: f"sdcore.conv3x3: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))

    @torch.library.register_fake("sdcore::geglu")
    def _geglu_fake(h, bias=None):
        _check_devices("geglu", h=h, bias=bias)
        torch._check(h.dim() >= 1 and h.shape[-1] % 2 == 0,
                     lambda: f"sdcore.geglu: the last dim of h must be even, got shape {list(h.shape)}")
        return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)

    @torch.library.register_fake("sdcore::linear_add")
    def _linear_add_fake(x, weight, bias, residual):
        _check_devices("linear_add", x=x, weight=weight, bias=bias, residual=residual)
        torch._check(x.dim() >= 1 and weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                     lambda: f"sdcore.linear_add: weight must be [out_features, {x.shape[-1]}], "
                             f"got {list(weight.shape)}")
        out_shape = (*x.shape[:-1], weight.shape[0])
        torch._check(tuple(residual.shape) == out_shape,
                     lambda: f"sdcore.linear_add: residual must have shape {list(out_shape)}, "
                             f"got {list(residual.shape)}")
        return x.new_empty(out_shape)

    @torch.library.register_fake("sdcore::scheduler_step")
    def _scheduler_step_fake(model_output, sample, coeffs, history, history_coeffs, noise=None,
                             guidance_scale=None, return_state=True):
        _check_devices("scheduler_step", sample=sample, model_output=model_output, noise=noise,
                       **{f"history[{i}]": h for i, h in enumerate(history)})
        out = sample.new_empty(sample.shape)
        state = sample.new_empty(sample.shape) if return_state else sample.new_empty((0,))
        return out, state
