"""UNet2DConditionModel (Rombach et al. 2022): SD 1.x / 2.x's noise predictor, with diffusers' parameter names
and config keys. A U of resnet stages with spatial transformers that cross-attend to the text embeddings, all
conditioned on the timestep through a sinusoidal embedding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import loading, ops
from .layers import Downsample, GroupNorm, ResnetBlock, Upsample

DEFAULTS = dict(sample_size=None, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
                cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
                num_attention_heads=None, use_linear_projection=False, upcast_attention=False)
# diffusers options beyond SD 1.x / 2.x: a config may name them only with the values listed (their defaults).
FIXED = dict(center_input_sample=(False,), downsample_padding=(1,), mid_block_scale_factor=(1,),
             act_fn=("silu", "swish"), dual_cross_attention=(False,), encoder_hid_dim_type=(None,),
             class_embed_type=(None,), num_class_embeds=(None,), addition_embed_type=(None,),
             resnet_time_scale_shift=("default",), resnet_skip_time_act=(False,), resnet_out_scale_factor=(1,),
             time_embedding_type=("positional",), time_embedding_dim=(None,), time_embedding_act_fn=(None,),
             timestep_post_act=(None,), time_cond_proj_dim=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,),
             attention_type=("default",), class_embeddings_concat=(False,), cross_attention_norm=(None,),
             reverse_transformer_layers_per_block=(None,), mid_block_type=("UNetMidBlock2DCrossAttn",))
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has cross-attention transformers
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """The Transformer's sinusoidal position encoding of the (possibly fractional) timestep, [B] -> [B, dim]:
    geometric frequencies from 1 down to about 1/10000, in float32 whatever the model's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / (half - freq_shift))
    angles = timesteps[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoidal features into the embedding every resnet is conditioned on."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


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


def _check_config(config: dict) -> None:
    for key, allowed in FIXED.items():
        if key in config and config[key] not in allowed:
            raise ValueError(f"UNet2DConditionModel: unsupported {key}={config[key]!r} (sdcore supports "
                             f"{' or '.join(map(repr, allowed))})")
    only_cross = config.get("only_cross_attention", False)
    if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]):
        raise ValueError(f"UNet2DConditionModel: unsupported only_cross_attention={only_cross!r} (SD keeps "
                         "self-attention in every transformer block)")
    if config.get("norm_num_groups", 32) is None:
        raise ValueError("UNet2DConditionModel: unsupported norm_num_groups=None (sdcore needs GroupNorm)")
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
        raise ValueError(f"UNet2DConditionModel: unsupported transformer_layers_per_block={depth!r} (one count "
                         "per block at most)")
    for key, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        unknown = sorted(set(config.get(key, DEFAULTS[key])) - set(known))
        if unknown:
            raise ValueError(f"UNet2DConditionModel: unsupported {key} {unknown} (sdcore supports {sorted(known)})")


def _per_block(value, key: str, n: int) -> list:
    """A config value given once for all blocks or as one entry per block, as a per-block list."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"UNet2DConditionModel: {key} has {len(value)} entries for {n} blocks")
    return list(value)


class UNet2DConditionModel(loading.Pretrained, nn.Module):
    """Predicts the noise (or v) in ``sample`` at ``timestep``, conditioned on the text's ``encoder_hidden_states``.
    Built from diffusers' unet/config.json keys (``from_config``) or a diffusers-format folder (``from_pretrained``);
    options SD 1.x / 2.x never use are rejected with a ValueError naming the key."""

    def __init__(self, **config):
        super().__init__()
        _check_config(config)
        self.config = cfg = loading.Config({**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}})
        ch = list(cfg.block_out_channels)
        n = len(ch)
        for key in ("down_block_types", "up_block_types"):
            if len(cfg[key]) != n:
                raise ValueError(f"UNet2DConditionModel: {key} has {len(cfg[key])} entries for {n} blocks")
        # diffusers' historical quirk: in SD configs "attention_head_dim" is the number of heads.
        heads_key = "num_attention_heads" if cfg.num_attention_heads is not None else "attention_head_dim"
        heads = _per_block(cfg[heads_key], heads_key, n)
        layers = _per_block(cfg.layers_per_block, "layers_per_block", n)
        depth = _per_block(cfg.transformer_layers_per_block, "transformer_layers_per_block", n)
        context = _per_block(cfg.cross_attention_dim, "cross_attention_dim", n)
        groups, eps, temb = cfg.norm_num_groups, cfg.norm_eps, 4 * ch[0]

        def transformer(i):  # the spatial transformers at down block i's resolution
            return dict(heads=heads[i], context_dim=context[i], depth=depth[i], linear=cfg.use_linear_projection,
                        upcast=cfg.upcast_attention)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]
        for i, kind in enumerate(cfg.down_block_types):
            last = i == n - 1
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], layers[i], temb, groups, eps,
                                              transformer(i) if DOWN_BLOCKS[kind] else None, downsample=not last))
            skip_channels += [ch[i]] * (layers[i] if last else layers[i] + 1)  # each resnet's, the downsampled
        self.mid_block = MidBlock(ch[-1], temb, groups, eps, transformer(n - 1))
        self.up_blocks = nn.ModuleList()
        for j, kind in enumerate(cfg.up_block_types):
            i = n - 1 - j  # the down block at this resolution
            skips = [skip_channels.pop() for _ in range(layers[i] + 1)]
            self.up_blocks.append(UpBlock(ch[min(i + 1, n - 1)], ch[i], skips, temb, groups, eps,
                                          transformer(i) if UP_BLOCKS[kind] else None, upsample=i > 0))
        self.conv_norm_out = GroupNorm(groups, ch[0], eps, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample [B, C, H, W]; timestep a number, a 0-d tensor or one per sample [B]; encoder_hidden_states
        [B, tokens, cross_attention_dim]. Returns the prediction, shaped like ``sample``."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        features = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                      self.config.freq_shift)
        temb = self.time_embedding(features.to(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        return self.conv_out(self.conv_norm_out(x))
