"""Plain, readable PyTorch for every sdcore op: the slow, obviously-right path that the kernels are
checked against. Half-precision inputs are computed in float32 (float64 stays float64) and the result
is returned in the input dtype."""
from __future__ import annotations

import math

import torch

from .step import StepCoefficients


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v. q [B,H,N,D], k/v [B,H,M,D]. The causal mask is
    top-left aligned: query i sees keys j <= i."""
    out_dtype = q.dtype
    dtype = _compute_dtype(out_dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = scale * (q @ k.transpose(-1, -2))
    if causal:
        n, m = scores.shape[-2:]
        visible = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(out_dtype)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, silu: bool = False):
    """Two-pass GroupNorm: mean, then the mean of squared deviations, per (batch, group); optional SiLU.
    The output keeps x's memory format."""
    dtype = _compute_dtype(x.dtype)
    b, c = x.shape[:2]
    xf = x.to(dtype).reshape(b, num_groups, -1)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xf - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(dtype).reshape(shape)
    if silu:
        y = y * torch.sigmoid(y)
    fmt = memory_format_of(x)
    return y.to(x.dtype).contiguous(memory_format=fmt)


def gated_gelu(h, bias=None):
    """GEGLU after its GEMM: with h (+ bias) split along the last dim into [value, gate], value * gelu(gate),
    GELU as x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2)))."""
    dtype = _compute_dtype(h.dtype)
    hf = h.to(dtype)
    if bias is not None:
        hf = hf + bias.to(dtype)
    value, gate = hf.chunk(2, dim=-1)
    return (value * (gate / 2 * (1 + torch.erf(gate / math.sqrt(2))))).to(h.dtype)


def geglu(x, weight, bias=None):
    """The GEGLU layer: gated_gelu(x @ weight^T, bias)."""
    dtype = _compute_dtype(x.dtype)
    return gated_gelu(x.to(dtype) @ weight.to(dtype).t(), bias).to(x.dtype)


def linear_add(x, weight, bias, residual):
    """x @ weight^T + bias + residual, in float32 (float64 for float64) and rounded once."""
    dtype = _compute_dtype(x.dtype)
    out = x.to(dtype) @ weight.to(dtype).t() + residual.to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(x.dtype)


def conv3x3(x, weight, bias=None):
    """The 3x3 convolution with stride 1 and padding 1, in float32 (float64 for float64) and rounded once.
    Written as the sum over the 9 filter taps of a channel mix of the shifted input, independent of F.conv2d.
    """
    dtype = _compute_dtype(x.dtype)
    b, c, h, w = x.shape
    padded = x.new_zeros((b, c, h + 2, w + 2), dtype=dtype)
    padded[:, :, 1:-1, 1:-1] = x
    weight = weight.to(dtype)
    out = padded.new_zeros((b, weight.shape[0], h, w))
    for dy in range(3):
        for dx in range(3):
            out += torch.einsum("bchw,oc->bohw", padded[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy, dx])
    if bias is not None:
        out += bias.to(dtype)[:, None, None]
    return out.to(x.dtype)


def memory_format_of(x) -> torch.memory_format:
    """The layout group_norm keeps: channels_last(_3d) for such dense inputs, else contiguous (the same
    rule as prepare_group_norm in csrc/common/checks.cpp)."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def scheduler_step(model_output, sample, coeffs: StepCoefficients, *, history=(), noise=None,
                   guidance_scale: float | None = None, return_state: bool = True):
    """One denoising step, term by term (see :class:`sdcore.step.StepCoefficients`)."""
    dtype = _compute_dtype(sample.dtype)
    x = sample.to(dtype)
    if guidance_scale is not None:
        uncond, cond = model_output.to(dtype).chunk(2)
        m = uncond + guidance_scale * (cond - uncond)
    else:
        m = model_output.to(dtype)
    x0 = coeffs.x0_from_sample * x + coeffs.x0_from_output * m
    if coeffs.clip > 0:
        x0 = x0.clamp(-coeffs.clip, coeffs.clip)
    out = coeffs.next_from_sample * x + coeffs.next_from_output * m + coeffs.next_from_x0 * x0
    for weight, h in zip(coeffs.history, history):
        out = out + weight * h.to(dtype)
    if coeffs.next_from_noise != 0:
        out = out + coeffs.next_from_noise * noise.to(dtype)
    state = None
    if return_state:
        state = (coeffs.state_from_sample * x + coeffs.state_from_output * m + coeffs.state_from_x0 * x0)
        state = state.to(sample.dtype)
    return out.to(sample.dtype), state
