"""Original LDM/CompVis single-file Stable Diffusion checkpoints (SD 1.x and 2.x, .safetensors or .ckpt) as
diffusers-named components: configs read off the tensors, state dicts renamed through tables.

Read from the tensors: the family (``cond_stage_model.transformer.*`` = OpenAI CLIP, SD 1.x;
``cond_stage_model.model.*`` = OpenCLIP, SD 2.x), every channel count, block count and layers-per-block of the
UNet and the VAE, the UNet's attention blocks, transformer depth, cross-attention width and projection kind
(conv 1x1 or linear), the text encoder's width, depth, MLP width, vocabulary and context length, and whether
EMA weights are present. By default the live ``model.diffusion_model.*`` weights are loaded (as diffusers and
A1111 do; "-emaonly" files keep their EMA weights there); use_ema=True takes LitEma's dot-less ``model_ema.*``
copies of a full training checkpoint instead.

Not in the tensors, so defaulted (each one can be overridden, see ``detect``):
  * UNet heads: SD 1.x's LDM config says ``num_heads: 8`` (``SD1_NUM_HEADS``); SD 2.x's says
    ``num_head_channels: 64`` (heads = channels // ``HEAD_CHANNELS`` per block). CLIP heads = width // 64.
  * prediction_type: "epsilon" for SD 1.x. For SD 2.x diffusers' heuristic: "epsilon" only when a .ckpt's
    ``global_step`` is 875000 (SD 2.0-base), else "v_prediction" (the 768 models) — pass prediction_type=
    "epsilon" for SD 2.x-base files. v-prediction models also get upcast_attention=True (SD 2.1-768's config)
    and 768 px (sample_size 96); the others 512 px.
  * norm_num_groups 32, VAE scaling_factor 0.18215, the scheduler's scaled_linear betas 0.00085..0.012,
    steps_offset 1, skip_prk_steps (SD's PNDM settings).
  * OpenCLIP: SD 2.x conditions on the penultimate layer, so the text encoder has one layer less than the
    checkpoint's resblocks (23 of ViT-H's 24), as diffusers' SD 2.x text_encoder does.

Keys ignored by design: ``model_ema.*`` unless the EMA weights are used (then every one must be used, bar
``model_ema.decay`` / ``model_ema.num_updates``); in OpenCLIP ``visual.*``, ``text_projection``, ``logit_scale``,
``attn_mask`` and the resblocks past the penultimate; CLIP's ``embeddings.position_ids`` buffer (rebuilt as
0..N-1 where the installed CLIPTextModel keeps it); ``first_stage_model.loss.*`` (VAE training losses); DDPM buffers
(``betas``, ``alphas_cumprod``...), ``global_step``, ``epoch``. Any other key outside the components is
dropped with a warning; inside a component's prefix every key must be converted and every expected key
present, or a ValueError names them."""
from __future__ import annotations

import functools
import logging
import re

import torch

from .files import read_state_dict

log = logging.getLogger(__name__)

UNET, VAE, EMA = "model.diffusion_model.", "first_stage_model.", "model_ema."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
SD1_NUM_HEADS = 8
HEAD_CHANNELS = 64
SCALING_FACTOR = 0.18215
SD2_BASE_GLOBAL_STEP = 875000
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_OUTSIDE_IGNORED = re.compile(r"(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|"
                              r"logvar|lvlb_weights|global_step|epoch|model_ema\..*)$")


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path) -> dict:
    """The tensors of a single-file checkpoint, unwrapped from a .ckpt's top-level "state_dict" (its
    "global_step", when there is one, is kept under that key for the SD 2.x prediction-type heuristic)."""
    raw = read_state_dict(path)
    state = raw
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds no state dict")
    if state is not raw and "global_step" in raw:
        state = {**state, "global_step": raw["global_step"]}
    return state


def _get(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"missing tensors: {key}")
    return state[key]


def _count(state: dict, prefix: str) -> int:
    """How many numbered children ``prefix{N}.`` there are (checked to run 0..N-1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in state if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix}N: indices {sorted(found)} do not run from 0 without gaps")
    return len(found)


def _has(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _ema_name(key: str) -> str:
    """LitEma's flattened name: model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_
    blocks00weight."""
    return EMA + key[len("model."):].replace(".", "")


def _unet_view(state: dict, use_ema: bool) -> dict:
    """The UNet's tensors under their model.diffusion_model.* names: the EMA copies where asked for and present."""
    keys = [k for k in state if k.startswith(UNET)]
    if not (use_ema and _has(state, EMA + "diffusion_model")):
        return {k: state[k] for k in keys}
    missing = [_ema_name(k) for k in keys if _ema_name(k) not in state]
    if missing:
        raise ValueError(f"incomplete EMA weights: missing {', '.join(missing[:5])} (use_ema=False loads "
                         f"the non-EMA UNet)")
    used = {_ema_name(k) for k in keys} | {EMA + "decay", EMA + "num_updates"}
    extra = [k for k in state if k.startswith(EMA) and k not in used]
    if extra:
        raise ValueError(f"EMA tensors that match no UNet tensor: {', '.join(extra[:5])}")
    return {k: state[_ema_name(k)] for k in keys}


# ---------------------------------------------------------------------------------------------- detection
def detect(state: dict, *, prediction_type: str | None = None, num_heads: int | None = None,
           head_channels: int = HEAD_CHANNELS, unet_overrides: dict | None = None,
           vae_overrides: dict | None = None, text_overrides: dict | None = None) -> dict:
    """The family and diffusers-style configs of an LDM checkpoint's state dict.

    ``num_heads`` fixes the UNet's head count (SD 1.x default 8); otherwise SD 2.x's UNet and both text
    encoders get width // ``head_channels`` heads. The ``*_overrides`` dicts are merged over the results.
    Returns {"family": "sd1"|"sd2", "ema": bool, "unet_config", "vae_config", "text_config",
    "scheduler_config"}."""
    if not _has(state, UNET):
        prefixes = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"not an LDM/CompVis Stable Diffusion checkpoint: expected the UNet under '{UNET}*' "
                         f"(with '{VAE}*' and 'cond_stage_model.*'); top-level names found: {prefixes[:10]}")
    if _has(state, OPEN_CLIP + "token_embedding."):
        family = "sd2"
    elif _has(state, CLIP):
        family = "sd1"
    else:
        hint = " (an SDXL checkpoint?)" if _has(state, "conditioner.") else ""
        raise ValueError(f"no text encoder{hint}: expected '{CLIP}*' (SD 1.x, OpenAI CLIP) or "
                         f"'{OPEN_CLIP}*' (SD 2.x, OpenCLIP)")
    text = {**_text_config(state, family, head_channels), **(text_overrides or {})}
    if prediction_type is None:
        v_pred = family == "sd2" and int(state.get("global_step", -1)) != SD2_BASE_GLOBAL_STEP
        prediction_type = "v_prediction" if v_pred else "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    v_pred = prediction_type == "v_prediction"
    image_size = 768 if family == "sd2" and v_pred else 512

    vae = {**_vae_config(state, image_size), **(vae_overrides or {})}
    heads = num_heads if num_heads is not None else (SD1_NUM_HEADS if family == "sd1" else None)
    unet = _unet_config(state, heads, head_channels)
    unet.update(sample_size=image_size // 2 ** (len(vae["block_out_channels"]) - 1),
                upcast_attention=family == "sd2" and v_pred, **(unet_overrides or {}))
    if unet["in_channels"] != vae["latent_channels"]:
        kind = "an inpainting" if unet["in_channels"] == vae["latent_channels"] * 2 + 1 else "a non-text-to-image"
        raise ValueError(f"{kind} UNet ({unet['in_channels']} input channels for {vae['latent_channels']} latent "
                         f"channels) is not supported: only text-to-image SD 1.x / 2.x checkpoints")
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise ValueError(f"the UNet cross-attends to width {unet['cross_attention_dim']} but the text encoder's "
                         f"width is {text['hidden_size']}")
    scheduler = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type=prediction_type, steps_offset=1,
                     skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
    return dict(family=family, ema=_has(state, EMA + "diffusion_model"), unet_config=unet, vae_config=vae,
                text_config=text, scheduler_config=scheduler)


def _unet_config(state: dict, num_heads: int | None, head_channels: int) -> dict:
    u = lambda key: _get(state, UNET + key)  # noqa: E731
    n_in = _count(state, UNET + "input_blocks.")
    n_down = sum(UNET + f"input_blocks.{i}.0.op.weight" in state for i in range(n_in))
    nb = n_down + 1
    per_block, rest = divmod(n_in - 1 - n_down, nb)
    n_out = _count(state, UNET + "output_blocks.")
    if rest or per_block < 1 or n_out != nb * (per_block + 1):
        raise ValueError(f"unexpected UNet layout: {n_in} input blocks ({n_down} downsampling), {n_out} output "
                         "blocks")
    first = [1 + b * (per_block + 1) for b in range(nb)]
    ch = [u(f"input_blocks.{i}.0.out_layers.3.weight").shape[0] for i in first]
    down_attn = [_has(state, UNET + f"input_blocks.{i}.1.") for i in first]
    up_attn = [_has(state, UNET + f"output_blocks.{b * (per_block + 1)}.1.") for b in range(nb)]
    attn = [f"input_blocks.{first[b]}.1" for b in range(nb) if down_attn[b]] + ["middle_block.1"] + \
        [f"output_blocks.{b * (per_block + 1)}.1" for b in range(nb) if up_attn[b]]
    depths = {_count(state, UNET + f"{a}.transformer_blocks.") for a in attn}
    if len(depths) != 1:
        raise ValueError(f"UNet transformer depths differ between blocks ({sorted(depths)}): not SD 1.x / 2.x")
    if num_heads is None:
        if any(c % head_channels for c in ch):
            raise ValueError(f"UNet channels {ch} are not multiples of head_channels={head_channels}")
        num_heads = [c // head_channels for c in ch]
    return dict(
        in_channels=u("input_blocks.0.0.weight").shape[1], out_channels=u("out.2.weight").shape[0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        block_out_channels=ch, layers_per_block=per_block, transformer_layers_per_block=depths.pop(),
        cross_attention_dim=u("middle_block.1.transformer_blocks.0.attn2.to_k.weight").shape[1],
        attention_head_dim=num_heads, use_linear_projection=u("middle_block.1.proj_in.weight").ndim == 2,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        center_input_sample=False, downsample_padding=1, only_cross_attention=False)


def _vae_config(state: dict, image_size: int) -> dict:
    nb = _count(state, VAE + "encoder.down.")
    ch = [_get(state, VAE + f"encoder.down.{i}.block.0.conv1.weight").shape[0] for i in range(nb)]
    return dict(in_channels=_get(state, VAE + "encoder.conv_in.weight").shape[1],
                out_channels=_get(state, VAE + "decoder.conv_out.weight").shape[0],
                down_block_types=["DownEncoderBlock2D"] * nb, up_block_types=["UpDecoderBlock2D"] * nb,
                block_out_channels=ch, layers_per_block=_count(state, VAE + "encoder.down.0.block."),
                latent_channels=_get(state, VAE + "decoder.conv_in.weight").shape[1], norm_num_groups=32,
                sample_size=image_size, scaling_factor=SCALING_FACTOR, act_fn="silu",
                use_quant_conv=VAE + "quant_conv.weight" in state,
                use_post_quant_conv=VAE + "post_quant_conv.weight" in state,
                mid_block_add_attention=_has(state, VAE + "encoder.mid.attn_1."))


# Where the text encoder's sizes are read, per family: token embedding, positions, layers, a layer's first MLP.
TEXT_LAYOUT = {"sd1": ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "encoder.layers.",
                       "mlp.fc1.weight"),
               "sd2": ("token_embedding.weight", "positional_embedding", "transformer.resblocks.", "mlp.c_fc.weight")}


def _text_config(state: dict, family: str, head_channels: int) -> dict:
    sd2 = family == "sd2"
    p = OPEN_CLIP if sd2 else CLIP + ("text_model." if _has(state, CLIP + "text_model.") else "")
    tokens, positions, layers, fc1 = TEXT_LAYOUT[family]
    vocab_size, width = _get(state, p + tokens).shape
    projection = state.get(p + "text_projection") if sd2 else None
    ids = dict(bos_token_id=49406, eos_token_id=49407) if vocab_size >= 49408 else {}
    return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=_get(state, f"{p}{layers}0.{fc1}").shape[0],
                num_hidden_layers=_count(state, p + layers) - sd2,  # SD 2.x conditions on the penultimate layer
                num_attention_heads=max(width // head_channels, 1),
                max_position_embeddings=_get(state, p + positions).shape[0], layer_norm_eps=1e-5,
                hidden_act="gelu" if sd2 else "quick_gelu",
                projection_dim=width if projection is None else projection.shape[1], **ids)


# ---------------------------------------------------------------------------------------------- tables
# A table is a list of (checkpoint name, diffusers name, transform or None); _apply checks it both ways.
def _wb(src: str, dst: str, fn=None) -> list:
    return [(f"{src}.{p}", f"{dst}.{p}", fn) for p in ("weight", "bias")]


def _renamed(src: str, dst: str, names: dict, fn=None) -> list:
    return [row for a, b in names.items() for row in _wb(f"{src}.{a}", f"{dst}.{b}", fn)]


UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2"}
VAE_RESNET = {n: n for n in ("norm1", "conv1", "norm2", "conv2")}
VAE_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # 1x1 convs -> Linear
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
TRANSFORMER_WB = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _to_linear(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if w.ndim > 2 else w


def _unet_resnet(src: str, dst: str, shortcut: bool) -> list:
    return _renamed(src, dst, {**UNET_RESNET, **({"skip_connection": "conv_shortcut"} if shortcut else {})})


def _transformer(src: str, dst: str, depth: int) -> list:
    """SpatialTransformer: LDM and diffusers share the inner names (norm, proj_in/out, transformer_blocks)."""
    blocks = [f"transformer_blocks.{t}" for t in range(depth)]
    names = ["norm", "proj_in", "proj_out"] + [f"{tb}.{n}" for tb in blocks for n in TRANSFORMER_WB]
    rows = [row for n in names for row in _wb(f"{src}.{n}", f"{dst}.{n}")]
    qkv = [f"{tb}.{a}.to_{x}.weight" for tb in blocks for a in ("attn1", "attn2") for x in "qkv"]
    return rows + [(f"{src}.{n}", f"{dst}.{n}", None) for n in qkv]


def _unet_table(cfg: dict) -> list:
    ch, per_block, depth = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["transformer_layers_per_block"]
    nb, up_attn = len(ch), [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    if not isinstance(depth, int):
        raise ValueError(f"transformer_layers_per_block={depth!r}: one depth for all blocks only")
    rows = _wb("time_embed.0", "time_embedding.linear_1") + _wb("time_embed.2", "time_embedding.linear_2") + \
        _wb("input_blocks.0.0", "conv_in") + _wb("out.0", "conv_norm_out") + _wb("out.2", "conv_out")
    for b, kind in enumerate(cfg["down_block_types"]):  # input_blocks 1.. : L x (resnet[, attention]), downsample
        for j in range(per_block):
            i, cin = 1 + b * (per_block + 1) + j, ch[b - 1] if j == 0 and b > 0 else ch[b]
            rows += _unet_resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", cin != ch[b])
            if kind.startswith("CrossAttn"):
                rows += _transformer(f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", depth)
        if b < nb - 1:
            rows += _wb(f"input_blocks.{(b + 1) * (per_block + 1)}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
    rows += _unet_resnet("middle_block.0", "mid_block.resnets.0", False) + \
        _transformer("middle_block.1", "mid_block.attentions.0", depth) + \
        _unet_resnet("middle_block.2", "mid_block.resnets.1", False)
    for b in range(nb):  # output_blocks: (L + 1) x (resnet on the concatenated skip[, attention][, upsample])
        for j in range(per_block + 1):
            i = b * (per_block + 1) + j
            rows += _unet_resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", True)
            if up_attn[b]:
                rows += _transformer(f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", depth)
        if b < nb - 1:
            last = (b + 1) * (per_block + 1) - 1
            rows += _wb(f"output_blocks.{last}.{2 if up_attn[b] else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv")
    return rows


def _vae_resnet(src: str, dst: str, shortcut: bool) -> list:
    return _renamed(src, dst, {**VAE_RESNET, **({"nin_shortcut": "conv_shortcut"} if shortcut else {})})


def _vae_table(cfg: dict) -> list:
    ch, per_block = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    nb, rows = len(ch), []
    for part in ("encoder", "decoder"):
        rows += _renamed(part, part, {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"})
        rows += _vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        rows += _vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
        if cfg.get("mid_block_add_attention", True):
            rows += _wb(f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm")
            rows += _renamed(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION, _to_linear)
    for i in range(nb):
        for j in range(per_block):
            cin = ch[i - 1] if j == 0 and i > 0 else ch[i]
            rows += _vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin != ch[i])
        if i < nb - 1:
            rows += _wb(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    rev = ch[::-1]
    for k in range(nb):  # LDM numbers the decoder's stages from the full resolution up, diffusers from the latent
        i = nb - 1 - k
        for j in range(per_block + 1):
            cin = rev[k - 1] if j == 0 and k > 0 else rev[k]
            rows += _vae_resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", cin != rev[k])
        if k < nb - 1:
            rows += _wb(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    for conv in ("quant_conv", "post_quant_conv"):
        if cfg.get(f"use_{conv}", True):
            rows += _wb(conv, conv)
    return rows


def _apply(view: dict, prefix: str, rows: list, what: str, ignore=lambda key: False) -> dict:
    """Renames ``prefix``+src to dst for every row: each src must be there, and every key under ``prefix``
    must be some row's src or ignored by design."""
    sources = {src for src, _, _ in rows}
    missing = [prefix + s for s in dict.fromkeys(s for s, _, _ in rows) if prefix + s not in view]
    extra = [k for k in view if k.startswith(prefix) and k[len(prefix):] not in sources and not ignore(k[len(prefix):])]
    problems = [f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")] if missing else []
    if extra:
        problems.append(f"tensors not converted: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
    if problems:
        raise ValueError(f"{what}: " + " | ".join(problems))
    return {dst: fn(view[prefix + src]) if fn else view[prefix + src] for src, dst, fn in rows}


# ---------------------------------------------------------------------------------------------- converters
def convert_unet(state: dict, config: dict, *, use_ema: bool = False) -> dict:
    """model.diffusion_model.* (or the model_ema.* copies, when use_ema and present) -> diffusers UNet names."""
    return _apply(_unet_view(state, use_ema), UNET, _unet_table(config), "UNet")


def convert_vae(state: dict, config: dict | None = None) -> dict:
    """first_stage_model.* -> diffusers AutoencoderKL names (config: detect()'s vae_config, else read here)."""
    cfg = config or _vae_config(state, 512)
    return _apply(state, VAE, _vae_table(cfg), "VAE", ignore=lambda k: k.startswith("loss."))


@functools.lru_cache(maxsize=8)
def _text_model_keys(config_items: tuple) -> tuple:
    """The installed transformers' CLIPTextModel state-dict names for a config (built on the meta device):
    recent versions drop the "text_model." prefix and keep position_ids as a non-persistent buffer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return tuple(CLIPTextModel(CLIPTextConfig(**dict(config_items))).state_dict())


def _text_keys(config: dict) -> tuple[list, str]:
    keys = list(_text_model_keys(tuple(sorted((k, v) for k, v in config.items() if not isinstance(v, list)))))
    return keys, "text_model." if keys[0].startswith("text_model.") else ""


def convert_clip(state: dict, config: dict | None = None) -> dict:
    """OpenAI CLIP under cond_stage_model.transformer.* (HF names already) -> the installed CLIPTextModel's
    names; position_ids only if that model keeps them."""
    cfg = config or _text_config(state, "sd1", HEAD_CHANNELS)
    keys, _ = _text_keys(cfg)
    inner = "text_model." if _has(state, CLIP + "text_model.") else ""
    rows = [(inner + k.removeprefix("text_model."), k, None) for k in keys if not k.endswith(".position_ids")]
    out = _apply(state, CLIP, rows, "text encoder (CLIP)",
                 ignore=lambda k: k.removeprefix("text_model.") == "embeddings.position_ids")
    return _with_position_ids(out, keys, cfg)


def _with_position_ids(out: dict, keys: list, config: dict) -> dict:
    """Older transformers keep position_ids as a persistent buffer: made fresh (some fp16 SD 1.x files hold
    them as rounded floats)."""
    from ..models.text_encoder import position_ids

    out.update({k: position_ids(config) for k in keys if k.endswith(".position_ids")})
    return out


def convert_open_clip(state: dict, config: dict) -> dict:
    """OpenCLIP under cond_stage_model.model.* -> CLIPTextModel names, in_proj split into q/k/v, the layers
    from config["num_hidden_layers"] on (SD 2.x: the last) left out."""
    keys, pre = _text_keys(config)
    n = config["num_hidden_layers"]
    rows = [("token_embedding.weight", f"{pre}embeddings.token_embedding.weight", None),
            ("positional_embedding", f"{pre}embeddings.position_embedding.weight", None)]
    rows += _wb("ln_final", f"{pre}final_layer_norm")
    for i in range(n):
        src, dst = f"transformer.resblocks.{i}", f"{pre}encoder.layers.{i}"
        rows += _renamed(src, dst, OPEN_CLIP_LAYER)
        for j, x in enumerate("qkv"):  # in_proj = [q; k; v] stacked on the output dimension
            rows += [(f"{src}.attn.in_proj_{p}", f"{dst}.self_attn.{x}_proj.{p}",
                      lambda t, j=j: t.chunk(3, dim=0)[j].clone()) for p in ("weight", "bias")]

    def ignore(key: str) -> bool:
        block = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        return key.startswith("visual.") or key in ("text_projection", "logit_scale", "attn_mask") or \
            bool(block and int(block[1]) >= n)

    return _with_position_ids(_apply(state, OPEN_CLIP, rows, "text encoder (OpenCLIP)", ignore), keys, config)


# ---------------------------------------------------------------------------------------------- loading
def _warn_unconsumed(state: dict, consumed: tuple) -> None:
    left = sorted({k.split(".")[0] for k in state if not k.startswith(consumed) and not _OUTSIDE_IGNORED.match(k)})
    if left:
        log.warning("single-file checkpoint: ignoring tensors outside Stable Diffusion's components: %s", left)


def load_components(path, *, prediction_type: str | None = None, use_ema: bool = False, device=None, dtype=None,
                    **detect_kwargs) -> dict:
    """A single-file SD 1.x / 2.x checkpoint as plain dicts: {"family", "unet_config", "unet_state",
    "vae_config", "vae_state", "text_config", "text_state", "scheduler_config"}; errors name the file.
    ``detect_kwargs``: num_heads, head_channels, unet_overrides, vae_overrides, text_overrides (see detect)."""
    state = read_checkpoint(path)
    try:
        info = detect(state, prediction_type=prediction_type, **detect_kwargs)
        sd2 = info["family"] == "sd2"
        text_state = convert_open_clip(state, info["text_config"]) if sd2 else convert_clip(state, info["text_config"])
        out = dict(family=info["family"], unet_config=info["unet_config"],
                   unet_state=convert_unet(state, info["unet_config"], use_ema=use_ema),
                   vae_config=info["vae_config"], vae_state=convert_vae(state, info["vae_config"]),
                   text_config=info["text_config"], text_state=text_state,
                   scheduler_config=info["scheduler_config"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    _warn_unconsumed(state, (UNET, VAE, OPEN_CLIP if sd2 else CLIP))
    if device is not None or dtype is not None:
        for key in ("unet_state", "vae_state", "text_state"):
            out[key] = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                        for k, v in out[key].items()}
    return out
