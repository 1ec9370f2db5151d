"""The original LDM / SGM checkpoint layout (CompVis' and Stability's training code) read into diffusers'
names: configs read off the tensors' shapes, and renaming tables that are checked both ways (every table
entry must be in the file, every tensor under a component's prefix must be converted or ignored by design).
Shared by single_file (SD 1.x / 2.x) and single_file_xl (SDXL base and refiner)."""
from __future__ import annotations

import functools
import re

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."


def get_tensor(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"missing tensors: {key}")
    return state[key]


def count_children(state: dict, prefix: str) -> int:
    """How many numbered children ``prefix{N}.`` there are (checked to run 0..N-1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in state if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix}N: indices {sorted(found)} do not run from 0 without gaps")
    return len(found)


def has_prefix(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


# ---------------------------------------------------------------------------------------------- configs
def _depth(state: dict, blocks: list[str]) -> int | None:
    """The transformer depth shared by the attention blocks named (None: there are none); they must agree."""
    heads = [UNET + f"{b}.transformer_blocks." for b in blocks]  # (an UpBlock2D's slot 1 is its upsampler)
    depths = {count_children(state, h) for h in heads if has_prefix(state, h)}
    if len(depths) > 1:
        raise ValueError(f"UNet transformer depths differ within a block ({', '.join(blocks)}: {sorted(depths)})")
    return depths.pop() if depths else None


def _transformer_depths(state: dict, nb: int, per_block: int) -> int | list[int]:
    """diffusers' transformer_layers_per_block off the tensors: one depth per down block, which the up blocks
    take in reverse and the mid block from the last (SDXL base: [1, 2, 10], its first block having no
    attention, where diffusers' config says 1); a single int where all agree (SD 1.x / 2.x: 1, the SDXL
    refiner: 4). A layout that this does not describe is an error."""
    down = [_depth(state, [f"input_blocks.{1 + b * (per_block + 1) + j}.1" for j in range(per_block)])
            for b in range(nb)]
    up = [_depth(state, [f"output_blocks.{k * (per_block + 1) + j}.1" for j in range(per_block + 1)])
          for k in range(nb)]
    mid = _depth(state, ["middle_block.1"])
    known = {d for d in down + up + [mid] if d is not None}
    if len(known) == 1:
        return known.pop()
    per = [d if d is not None else u if u is not None else 1 for d, u in zip(down, reversed(up))]
    if any(u not in (None, per[nb - 1 - k]) for k, u in enumerate(up)) or mid not in (None, per[-1]):
        raise ValueError(f"UNet transformer depths down {down}, mid {mid}, up {up}: the up blocks must mirror the "
                         "down blocks and the mid block match the last (diffusers' transformer_layers_per_block)")
    return per


def unet_config(state: dict, num_heads: int | list | None, head_channels: int) -> dict:
    """A UNet2DConditionModel config off model.diffusion_model.*; heads: ``num_heads``, else channels //
    ``head_channels`` per block."""
    u = lambda key: get_tensor(state, UNET + key)  # noqa: E731
    n_in = count_children(state, UNET + "input_blocks.")
    n_down = sum(UNET + f"input_blocks.{i}.0.op.weight" in state for i in range(n_in))
    nb = n_down + 1
    per_block, rest = divmod(n_in - 1 - n_down, nb)
    n_out = count_children(state, UNET + "output_blocks.")
    if rest or per_block < 1 or n_out != nb * (per_block + 1):
        raise ValueError(f"unexpected UNet layout: {n_in} input blocks ({n_down} downsampling), {n_out} output "
                         "blocks")
    first = [1 + b * (per_block + 1) for b in range(nb)]
    ch = [u(f"input_blocks.{i}.0.out_layers.3.weight").shape[0] for i in first]
    down_attn = [has_prefix(state, UNET + f"input_blocks.{i}.1.") for i in first]
    up_attn = [has_prefix(state, UNET + f"output_blocks.{b * (per_block + 1)}.1.") for b in range(nb)]
    depths = _transformer_depths(state, nb, per_block)
    if num_heads is None:
        if any(c % head_channels for c in ch):
            raise ValueError(f"UNet channels {ch} are not multiples of head_channels={head_channels}")
        num_heads = [c // head_channels for c in ch]
    return dict(
        in_channels=u("input_blocks.0.0.weight").shape[1], out_channels=u("out.2.weight").shape[0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        block_out_channels=ch, layers_per_block=per_block, transformer_layers_per_block=depths,
        cross_attention_dim=u("middle_block.1.transformer_blocks.0.attn2.to_k.weight").shape[1],
        attention_head_dim=num_heads, use_linear_projection=u("middle_block.1.proj_in.weight").ndim == 2,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        center_input_sample=False, downsample_padding=1, only_cross_attention=False)


def vae_config(state: dict, image_size: int, scaling_factor: float) -> dict:
    """An AutoencoderKL config off first_stage_model.*."""
    nb = count_children(state, VAE + "encoder.down.")
    ch = [get_tensor(state, VAE + f"encoder.down.{i}.block.0.conv1.weight").shape[0] for i in range(nb)]
    return dict(in_channels=get_tensor(state, VAE + "encoder.conv_in.weight").shape[1],
                out_channels=get_tensor(state, VAE + "decoder.conv_out.weight").shape[0],
                down_block_types=["DownEncoderBlock2D"] * nb, up_block_types=["UpDecoderBlock2D"] * nb,
                block_out_channels=ch, layers_per_block=count_children(state, VAE + "encoder.down.0.block."),
                latent_channels=get_tensor(state, VAE + "decoder.conv_in.weight").shape[1], norm_num_groups=32,
                sample_size=image_size, scaling_factor=scaling_factor, act_fn="silu",
                use_quant_conv=VAE + "quant_conv.weight" in state,
                use_post_quant_conv=VAE + "post_quant_conv.weight" in state,
                mid_block_add_attention=has_prefix(state, VAE + "encoder.mid.attn_1."))


# Where a text encoder's sizes are read: token embedding, positions, layers, a layer's first MLP.
TEXT_LAYOUT = {"clip": ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "encoder.layers.",
                        "mlp.fc1.weight"),
               "open_clip": ("token_embedding.weight", "positional_embedding", "transformer.resblocks.",
                             "mlp.c_fc.weight")}


def clip_prefix(state: dict, prefix: str) -> str:
    """OpenAI CLIP's tensors under ``prefix``, with or without transformers' old "text_model." level."""
    return prefix + ("text_model." if has_prefix(state, prefix + "text_model.") else "")


def text_config(state: dict, prefix: str, open_clip: bool, head_channels: int, drop_last: bool = False) -> dict:
    """A CLIPTextConfig off OpenAI CLIP (HF names, quick_gelu) or OpenCLIP (gelu) tensors under ``prefix``;
    ``drop_last``: one layer less than the file has (SD 2.x conditions on the penultimate layer)."""
    p = prefix if open_clip else clip_prefix(state, prefix)
    tokens, positions, layers, fc1 = TEXT_LAYOUT["open_clip" if open_clip else "clip"]
    vocab_size, width = get_tensor(state, p + tokens).shape
    projection = state.get(p + "text_projection") if open_clip else None
    ids = dict(bos_token_id=49406, eos_token_id=49407) if vocab_size >= 49408 else {}
    mlp = get_tensor(state, f"{p}{layers}0.{fc1}").shape[0]
    return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=mlp,
                num_hidden_layers=count_children(state, p + layers) - drop_last,
                num_attention_heads=max(width // head_channels, 1),
                max_position_embeddings=get_tensor(state, p + positions).shape[0], layer_norm_eps=1e-5,
                hidden_act="gelu" if open_clip else "quick_gelu",
                projection_dim=width if projection is None else projection.shape[1], **ids)


# ---------------------------------------------------------------------------------------------- tables
# A table is a list of (checkpoint name, diffusers name, transform or None); apply checks it both ways.
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


def unet_table(cfg: dict) -> list:
    """model.diffusion_model.* names (less the prefix) -> diffusers' UNet2DConditionModel names."""
    ch, per_block, depth = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["transformer_layers_per_block"]
    nb, up_attn = len(ch), [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    depths = [depth] * nb if isinstance(depth, int) else list(depth)
    rows = _wb("time_embed.0", "time_embedding.linear_1") + _wb("time_embed.2", "time_embedding.linear_2") + \
        _wb("input_blocks.0.0", "conv_in") + _wb("out.0", "conv_norm_out") + _wb("out.2", "conv_out")
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's embedding of pooled text + time ids
        rows += _wb("label_emb.0.0", "add_embedding.linear_1") + _wb("label_emb.0.2", "add_embedding.linear_2")
    for b, kind in enumerate(cfg["down_block_types"]):  # input_blocks 1.. : L x (resnet[, attention]), downsample
        for j in range(per_block):
            i, cin = 1 + b * (per_block + 1) + j, ch[b - 1] if j == 0 and b > 0 else ch[b]
            rows += _unet_resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", cin != ch[b])
            if kind.startswith("CrossAttn"):
                rows += _transformer(f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", depths[b])
        if b < nb - 1:
            rows += _wb(f"input_blocks.{(b + 1) * (per_block + 1)}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
    rows += _unet_resnet("middle_block.0", "mid_block.resnets.0", False) + \
        _transformer("middle_block.1", "mid_block.attentions.0", depths[-1]) + \
        _unet_resnet("middle_block.2", "mid_block.resnets.1", False)
    for b in range(nb):  # output_blocks: (L + 1) x (resnet on the concatenated skip[, attention][, upsample])
        for j in range(per_block + 1):
            i = b * (per_block + 1) + j
            rows += _unet_resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", True)
            if up_attn[b]:
                rows += _transformer(f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", depths[nb - 1 - b])
        if b < nb - 1:
            last = (b + 1) * (per_block + 1) - 1
            rows += _wb(f"output_blocks.{last}.{2 if up_attn[b] else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv")
    return rows


def _vae_resnet(src: str, dst: str, shortcut: bool) -> list:
    return _renamed(src, dst, {**VAE_RESNET, **({"nin_shortcut": "conv_shortcut"} if shortcut else {})})


def vae_table(cfg: dict) -> list:
    """first_stage_model.* names (less the prefix) -> diffusers' AutoencoderKL names."""
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


def apply(view: dict, prefix: str, rows: list, what: str, ignore=lambda key: False) -> dict:
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
def convert_vae(state: dict, config: dict) -> dict:
    """first_stage_model.* -> diffusers AutoencoderKL names."""
    return apply(state, VAE, vae_table(config), "VAE", ignore=lambda k: k.startswith("loss."))


@functools.lru_cache(maxsize=8)
def _text_model_keys(config_items: tuple, with_projection: bool) -> tuple:
    """The installed transformers' CLIPTextModel (or CLIPTextModelWithProjection) state-dict names for a config
    (built on the meta device): recent versions drop CLIPTextModel's "text_model." level (not the projection
    model's) and keep position_ids as a non-persistent buffer."""
    import transformers

    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    with torch.device("meta"):
        return tuple(cls(transformers.CLIPTextConfig(**dict(config_items))).state_dict())


def _text_keys(config: dict, with_projection: bool = False) -> tuple[list, str]:
    items = tuple(sorted((k, v) for k, v in config.items() if not isinstance(v, list)))
    keys = list(_text_model_keys(items, with_projection))
    return keys, "text_model." if keys[0].startswith("text_model.") else ""


def convert_clip(state: dict, config: dict, prefix: str = CLIP) -> dict:
    """OpenAI CLIP under ``prefix`` (HF names already) -> the installed CLIPTextModel's names; position_ids
    only if that model keeps them."""
    keys, _ = _text_keys(config)
    inner = clip_prefix(state, prefix)[len(prefix):]
    rows = [(inner + k.removeprefix("text_model."), k, None) for k in keys if not k.endswith(".position_ids")]
    out = apply(state, prefix, rows, "text encoder (CLIP)",
                ignore=lambda k: k.removeprefix("text_model.") == "embeddings.position_ids")
    return _with_position_ids(out, keys, config)


def _with_position_ids(out: dict, keys: list, config: dict) -> dict:
    """Older transformers keep position_ids as a persistent buffer: made fresh (some fp16 SD 1.x files hold
    them as rounded floats)."""
    from ..models.text_encoder import position_ids

    out.update({k: position_ids(config) for k in keys if k.endswith(".position_ids")})
    return out


def convert_open_clip(state: dict, config: dict, prefix: str = OPEN_CLIP, projection: bool = False) -> dict:
    """OpenCLIP under ``prefix`` -> CLIPTextModel names, in_proj split into q/k/v, the layers from
    config["num_hidden_layers"] on (SD 2.x: the last) left out. ``projection``: CLIPTextModelWithProjection
    instead (SDXL's second encoder), whose text_projection.weight is OpenCLIP's text_projection transposed
    (OpenCLIP computes x @ P, a Linear x @ W.T)."""
    keys, pre = _text_keys(config, with_projection=projection)
    n = config["num_hidden_layers"]
    rows = [("token_embedding.weight", f"{pre}embeddings.token_embedding.weight", None),
            ("positional_embedding", f"{pre}embeddings.position_embedding.weight", None)]
    rows += _wb("ln_final", f"{pre}final_layer_norm")
    if projection:
        rows.append(("text_projection", "text_projection.weight", lambda t: t.T.contiguous()))
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

    return _with_position_ids(apply(state, prefix, rows, "text encoder (OpenCLIP)", ignore), keys, config)
