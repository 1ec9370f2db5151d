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
    ``upcast`` (SD 2.x) runs the attention in float32 for half-precision inputs, where its logits overflow."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D]
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = ops.attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = ops.attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """A linear layer whose output is gated by the GELU of a second half (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x width and back. net.1 is diffusers' dropout slot: an Identity keeps net.2's name."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


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
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


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
