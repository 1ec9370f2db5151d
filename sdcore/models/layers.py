"""Building blocks shared by sdcore's models; every GroupNorm and attention goes through sdcore.ops, so
sdcore.use_backend() flips the whole model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameter names) through sdcore.ops.group_norm, with the SiLU that follows it in
    SD's blocks optionally fused."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, silu: bool = False):
        super().__init__(num_groups, num_channels, eps)
        self.silu = silu

    def forward(self, x):
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(cin, cout, 3, padding=1) (same parameter names) through sdcore.ops.conv3x3 on the CPU, where
    the kernels backend runs it by Winograd's F(2x2, 3x3). On a GPU it is nn.Conv2d's own forward (cuDNN on
    every backend), without the op's checks and routing: a few microseconds of host time per call that a
    launch-bound eager UNet step would pay ~70 times."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        return ops.conv3x3(x, self.weight, self.bias)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a (1x1-projected) skip: diffusers' ResnetBlock2D. With ``temb_channels`` (the
    UNet) a projection of SiLU(time embedding) is added per channel after the first conv, which is how every
    resnet learns what noise level it is denoising."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, temb_channels: int | None = None):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps, silu=True)
        self.conv1 = Conv3x3(cin, cout)
        self.time_emb_proj = nn.Linear(temb_channels, cout) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, cout, eps, silu=True)
        self.conv2 = Conv3x3(cout, cout)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb: torch.Tensor | None = None):
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(h))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (the VAE mid-block), residual."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        b, c, h, w = x.shape
        # [B, HW, C]: a view of a channels_last map (a copy of an NCHW one), and back the same way
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out, proj = ops.attention(q, k, v).squeeze(1), self.to_out[0]
        if x.is_contiguous(memory_format=torch.channels_last):  # x is its rows of tokens: the GEMM adds it
            out = ops.linear_add(out, proj.weight, proj.bias, x.permute(0, 2, 3, 1).reshape(b, h * w, c))
            return out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + proj(out).reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE encoder's (padding=0) pads only right/bottom by one; the UNet's (padding=1)
    pads all sides, so an odd side n becomes ceil(n / 2)."""

    def __init__(self, channels: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.pad_right_bottom = padding == 0

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right_bottom else x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv. The UNet passes ``size``, the spatial size of the skip connection
    this output is concatenated with, so odd sides that the down path rounded up come back exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x, size: tuple[int, int] | None = None):
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
