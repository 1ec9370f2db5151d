"""AutoencoderKL (Rombach et al. 2022): SD's VAE, with diffusers' parameter names and config keys, and
diffusers' tiled encode / decode for large images (``enable_tiling``, see vae_tiling.py)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import loading
from .layers import Conv3x3, Downsample, GroupNorm, ResnetBlock, SpatialSelfAttention, Upsample
from .vae_tiling import OVERLAP_FACTOR, tiled

# diffusers' AutoencoderKL config keys and defaults. force_upcast (SDXL's VAE overflows in fp16, so its config
# asks for fp32 decoding), shift_factor and latents_mean/std are kept for the pipelines that read them.
DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1, latent_channels=4,
                norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None,
                latents_std=None, force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
                mid_block_add_attention=True, act_fn="silu")
EPS = 1e-6


class _Stage(nn.Module):
    def __init__(self, cin, cout, n, groups, resample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups, EPS) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = s(x)
        return x


class _MidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups, EPS), ResnetBlock(c, c, groups, EPS)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups, EPS)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = list(cfg["block_out_channels"]), cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = Conv3x3(cfg["in_channels"], ch[0])
        self.down_blocks = nn.ModuleList(
            [_Stage(ch[max(i - 1, 0)], ch[i], n, g, "down" if i < len(ch) - 1 else None) for i in range(len(ch))])
        self.mid_block = _MidBlock(ch[-1], g, cfg["mid_block_add_attention"])
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS, silu=True)
        self.conv_out = Conv3x3(ch[-1], 2 * cfg["latent_channels"])

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = list(reversed(cfg["block_out_channels"])), cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = Conv3x3(cfg["latent_channels"], ch[0])
        self.mid_block = _MidBlock(ch[0], g, cfg["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList(
            [_Stage(ch[max(i - 1, 0)], ch[i], n + 1, g, "up" if i < len(ch) - 1 else None) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS, silu=True)
        self.conv_out = Conv3x3(ch[-1], cfg["out_channels"])

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


@dataclasses.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, std^2) per latent element."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(loading.Pretrained, nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = loading.Config({**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}})
        for key in ("down_block_types", "up_block_types"):
            kinds = set(config.get(key, ()))
            if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
                raise ValueError(f"AutoencoderKL: unsupported {key} {sorted(kinds)}")
        lat = self.config["latent_channels"]
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if self.config["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if self.config["use_post_quant_conv"] else None
        # Tiling, off by default (diffusers' attribute names): tiles of the size the VAE was trained at.
        self.use_tiling = False
        size = self.config["sample_size"]
        self.tile_sample_min_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.tile_latent_min_size = self.tile_sample_min_size // 2 ** (len(self.config["block_out_channels"]) - 1)
        self.tile_overlap_factor = OVERLAP_FACTOR

    def enable_tiling(self) -> None:
        """Encode and decode images larger than a tile (config ``sample_size``) tile by tile, with blended seams,
        so memory stays bounded whatever the image size. The result differs a little from the untiled one."""
        if int(self.tile_latent_min_size * (1 - self.tile_overlap_factor)) < 1:
            raise ValueError(f"AutoencoderKL: sample_size={self.config['sample_size']} is too small to tile (a tile "
                             f"of {self.tile_latent_min_size} latent pixels)")
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            moments = tiled(x, self._moments, self.tile_sample_min_size, self.tile_latent_min_size,
                            self.tile_overlap_factor)
        else:
            moments = self._moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return tiled(z, self._decode, self.tile_latent_min_size, self.tile_sample_min_size,
                         self.tile_overlap_factor)
        return self._decode(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mean)
