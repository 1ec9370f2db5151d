"""The UNet's building blocks, with diffusers' parameter names: the spatial transformer (self-attention,
cross-attention to the text, GEGLU feed-forward) and the down, mid and up blocks of the U."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .layers import Downsample, GroupNorm, ResnetBlock, Upsample

class Attention(nn.Module):
    """Multi-head attention of image tokens over ``context`` (cross-attention to the text) or over themselves.
    ``upcast`` (SD 2.x) runs the attention in float32 for half-precision inputs, where its logits overflow.

    The projections that read the same input are one GEMM: q, k and v in self-attention, k and v in
    cross-attention. Their weights are row blocks of one tensor (the non-persistent buffer ``fused``), and
    ``to_q.weight`` & co. are views of those blocks, so the parameters and state-dict names are diffusers'
    and an in-place change of a parameter (loading, a LoRA merge) is a change of the fused weight: nothing to
    keep in sync, and captured CUDA graphs stay valid. q, k and v are then strided views of the GEMM's
    output, which the attention op reads as they are."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.is_self = context_dim is None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.register_buffer("fused", None, persistent=False)
        self._fuse()
        # A load with assign=True (a model built on the meta device) replaces the parameters: fuse them again.
        self.register_load_state_dict_post_hook(lambda module, _: module._fuse())

    def _group(self) -> list[nn.Parameter]:
        return [m.weight for m in ((self.to_q, self.to_k, self.to_v) if self.is_self else (self.to_k, self.to_v))]

    def _fuse(self) -> None:
        """Make the grouped weights views of consecutive row blocks of ``fused`` (a no-op when they already
        are, so that a ``.to()`` that changes nothing keeps every weight's storage)."""
        weights = self._group()
        fused = self.fused
        if fused is not None and not fused.is_meta and all(
                w.dtype == fused.dtype and w.device == fused.device and w.is_contiguous()
                and w.data_ptr() == fused.data_ptr() + i * w.numel() * w.element_size()
                for i, w in enumerate(weights)):
            return
        fused = torch.cat([w.detach() for w in weights])
        rows = weights[0].shape[0]
        for i, w in enumerate(weights):
            w.data = fused[i * rows:(i + 1) * rows]
        self.fused = fused

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # converts each parameter (and the buffer) on its own
        self._fuse()
        return self

    def forward(self, x, context=None, residual=None):
        """Attention over ``context`` (None: self-attention), plus ``residual`` when given (the out-projection's
        GEMM adds it: ops.linear_add)."""
        h = self.heads
        if context is None and self.is_self:  # [B, N, 3*H*D] -> q, k, v [B, H, N, D], strided views
            q, k, v = F.linear(x, self.fused).unflatten(-1, (3, h, -1)).permute(2, 0, 3, 1, 4)
        elif self.is_self:  # self-attention's weights over another context (the UNet never asks this)
            q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2)
                       for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        else:  # cross-attention: k, v in one GEMM over the context
            q = self.to_q(x).unflatten(-1, (h, -1)).transpose(1, 2)
            kv = F.linear(x if context is None else context, self.fused)
            k, v = kv.unflatten(-1, (2, h, -1)).permute(2, 0, 3, 1, 4)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = ops.attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = ops.attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)
        proj = self.to_out[0]
        return proj(out) if residual is None else ops.linear_add(out, proj.weight, proj.bias, residual)


class GEGLU(nn.Module):
    """A linear layer whose output is gated by the GELU of a second half (Shazeer 2020); on the kernels backend
    the bias, GELU and gate run as one pass after the GEMM (see ops.geglu)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        return ops.geglu(x, self.proj.weight, self.proj.bias)


class FeedForward(nn.Module):
    """GEGLU to 4x width and back. net.1 is diffusers' dropout slot: an Identity keeps net.2's name."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x, residual=None):
        """The feed-forward of x, plus ``residual`` when given (added by the last GEMM: ops.linear_add)."""
        x = self.net[0](x)
        out = self.net[2]
        return out(x) if residual is None else ops.linear_add(x, out.weight, out.bias, residual)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text and feed-forward, each residual
    (diffusers' BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        # Each residual is added by the GEMM that ends its branch (ops.linear_add), not by a pass of its own.
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer(nn.Module):
    """The spatial transformer (diffusers' Transformer2DModel): the feature map's pixels become tokens, pass
    through ``depth`` transformer blocks and are added back. proj_in/proj_out are per-pixel linear maps, stored
    as 1x1 convs in SD 1.x and as Linear in SD 2.x (use_linear_projection): the same map either way."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int, linear: bool,
                 upcast: bool):
        super().__init__()
        inner = heads * (channels // heads)
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, context_dim, upcast) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    @staticmethod
    def _per_pixel(proj: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, proj.weight.flatten(1), proj.bias)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = self._per_pixel(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if x.is_contiguous(memory_format=torch.channels_last):
            # x's pixels are already rows of tokens: proj_out's GEMM adds them (ops.linear_add). An NCHW x keeps
            # the separate add, which writes NCHW; its tokens would be a copy, and the output NHWC.
            weight = self.proj_out.weight.flatten(1)
            tokens = ops.linear_add(tokens, weight, self.proj_out.bias, x.permute(0, 2, 3, 1).reshape(b, h * w, c))
            return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
        tokens = self._per_pixel(self.proj_out, tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class DownBlock(nn.Module):
    """One resolution of the contracting path: resnets (each followed by a transformer in a cross-attention
    block), then a stride-2 conv. Every output is pushed onto ``skips`` for the expanding path."""

    def __init__(self, cin: int, cout: int, n: int, temb: int, groups: int, eps: float,
                 transformer: dict | None, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups, eps, temb) for i in range(n)])
        self.attentions = nn.ModuleList(
            [Transformer(cout, groups=groups, **transformer) for _ in range(n)] if transformer else [])
        self.downsamplers = nn.ModuleList([Downsample(cout, padding=1)]) if downsample else None

    def forward(self, x, temb, context, skips: list):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """The bottleneck: resnet, transformer, resnet (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, temb: int, groups: int, eps: float, transformer: dict):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, eps, temb) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer(channels, groups=groups, **transformer)])

    def forward(self, x, temb, context):
        x = self.attentions[0](self.resnets[0](x, temb), context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One resolution of the expanding path: each resnet takes the previous output concatenated with the
    latest skip (popped from ``skips``), then nearest 2x upsampling to the size of the next skip, which is how
    odd sizes rounded up by the stride-2 convs come back exactly."""

    def __init__(self, cin: int, cout: int, skip_channels: list[int], temb: int, groups: int, eps: float,
                 transformer: dict | None, upsample: bool):
        super().__init__()
        n = len(skip_channels)
        self.resnets = nn.ModuleList(
            [ResnetBlock((cin if i == 0 else cout) + skip_channels[i], cout, groups, eps, temb) for i in range(n)])
        self.attentions = nn.ModuleList(
            [Transformer(cout, groups=groups, **transformer) for _ in range(n)] if transformer else [])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x, temb, context, skips: list):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x
