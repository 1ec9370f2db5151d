"""UNet2DConditionModel (Rombach et al. 2022): SD 1.x / 2.x's and SDXL's noise predictor, with diffusers'
parameter names and config keys. A U of resnet stages with spatial transformers that cross-attend to the text
embeddings, all conditioned on the timestep through a sinusoidal embedding; SDXL (Podell et al. 2023) adds to
that embedding one made from the pooled text embedding and the "micro-conditioning" time ids (image sizes,
crop, aesthetic score)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import loading
from .layers import Conv3x3, GroupNorm
from .unet_blocks import DownBlock, MidBlock, UpBlock

DEFAULTS = dict(sample_size=None, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
                cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
                num_attention_heads=None, use_linear_projection=False, upcast_attention=False,
                addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
# diffusers options beyond SD 1.x / 2.x / XL: a config may name them only with the values listed (their defaults).
FIXED = dict(center_input_sample=(False,), downsample_padding=(1,), mid_block_scale_factor=(1,),
             act_fn=("silu", "swish"), dual_cross_attention=(False,), encoder_hid_dim_type=(None,),
             class_embed_type=(None,), num_class_embeds=(None,), addition_embed_type=(None, "text_time"),
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
    if config.get("addition_embed_type") == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"UNet2DConditionModel: addition_embed_type='text_time' needs {key} to be a "
                                 f"positive integer, got {value!r}")


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
    options SD 1.x / 2.x / XL never use are rejected with a ValueError naming the key."""

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

        self.conv_in = Conv3x3(cfg.in_channels, ch[0])
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + sinusoids of the time ids
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
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
        self.conv_out = Conv3x3(ch[0], cfg.out_channels)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """sample [B, C, H, W]; timestep a number, a 0-d tensor or one per sample [B]; encoder_hidden_states
        [B, tokens, cross_attention_dim]; for an SDXL UNet (addition_embed_type "text_time"),
        ``added_cond_kwargs={"text_embeds": [B, D], "time_ids": [B, n]}`` as diffusers takes them. Returns the
        prediction, shaped like ``sample``."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        features = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                      self.config.freq_shift)
        temb = self.time_embedding(features.to(sample.dtype))
        if self.config.addition_embed_type == "text_time":
            temb = temb + self.add_embedding(self._text_time(added_cond_kwargs, sample.shape[0]).to(temb.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        return self.conv_out(self.conv_norm_out(x))

    def _text_time(self, added_cond_kwargs: dict | None, batch: int) -> torch.Tensor:
        """SDXL's added conditioning, [B, projection_class_embeddings_input_dim]: the pooled text embedding, then
        each time id's own sinusoidal embedding (addition_time_embed_dim wide). The base model takes 6 time ids
        (original size, crop top-left, target size), the refiner 5 (the target size replaced by the aesthetic
        score): a count that does not fill projection_class_embeddings_input_dim is refused by name."""
        cfg = self.config
        if not isinstance(added_cond_kwargs, dict) or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            got = sorted(added_cond_kwargs) if isinstance(added_cond_kwargs, dict) else repr(added_cond_kwargs)
            raise ValueError("UNet2DConditionModel: this UNet has addition_embed_type='text_time' (SDXL), so it "
                             "needs added_cond_kwargs={'text_embeds': pooled [B, D], 'time_ids': [B, n]}; got "
                             f"{got}")
        text, ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        for name, value in (("text_embeds", text), ("time_ids", ids)):
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != batch:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"added_cond_kwargs[{name!r}] must be a [{batch}, n] tensor (one row per "
                                 f"sample), got {shape}")
        width = text.shape[1] + ids.shape[1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"added_cond_kwargs: {ids.shape[1]} time_ids x addition_time_embed_dim {cfg.addition_time_embed_dim}"
                f" + text_embeds width {text.shape[1]} = {width}, but this UNet's projection_class_embeddings_"
                f"input_dim is {cfg.projection_class_embeddings_input_dim} (SDXL base: 6 time ids; the refiner, "
                "requires_aesthetics_score: 5)")
        time = timestep_embedding(ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        return torch.cat([text, time.reshape(batch, -1).to(text.dtype)], dim=-1)
