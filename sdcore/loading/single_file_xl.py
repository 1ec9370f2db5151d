"""SDXL base and refiner single-file checkpoints (Stability's SGM layout, .safetensors or .ckpt) as
diffusers-named components, the way single_file does SD 1.x / 2.x (and through the same tables, ldm.py).

The layout:
  * ``model.diffusion_model.*``: the UNet, LDM's names plus ``label_emb.0.{0,2}``, the "text_time" embedding
    of the pooled text and the time ids, which becomes diffusers' ``add_embedding.linear_{1,2}``;
  * ``first_stage_model.*``: the VAE, as in SD 1.x / 2.x;
  * ``conditioner.embedders.0.transformer.*``: CLIP ViT-L in transformers' names -> ``text_encoder`` (base only);
  * ``conditioner.embedders.1.model.*`` (the refiner's: ``embedders.0.model.*``): OpenCLIP ViT-bigG ->
    ``text_encoder_2``, a CLIPTextModelWithProjection: ``in_proj`` split into q/k/v, ``text_projection``
    transposed. Both encoders keep all their layers (SDXL reads the penultimate hidden states, the pipeline
    picks them; the pooled embedding is the projection of the last layer's).

Read from the tensors, besides what single_file reads: base or refiner (which text encoders there are), the
transformer depth of every block (base [1, 2, 10], refiner 4), the text_time embedding's input width
(``projection_class_embeddings_input_dim``: 2816 base, 2560 refiner) and from it ``addition_time_embed_dim``
= (that width - the pooled width) / the number of time ids (base 6: original size, crop top-left, target
size; refiner 5: original size, crop top-left, aesthetic score), 256 in both.

Defaulted, as diffusers' SDXL configs: heads = channels // 64; 1024 px (UNet sample_size 128); the VAE's
scaling_factor 0.13025 and force_upcast (SDXL's VAE overflows in fp16); prediction_type "epsilon"; the
Euler scheduler (diffusers' default for XL single files); the pipeline's requires_aesthetics_score (refiner)
and force_zeros_for_empty_prompt (base)."""
from __future__ import annotations

from . import ldm
from .ldm import UNET, VAE, get_tensor
from .single_file import (HEAD_CHANNELS, PREDICTION_TYPES, XL, cast, check_sizes, convert_unet, model_type,
                          read_checkpoint, warn_unconsumed)

SCALING_FACTOR = 0.13025
IMAGE_SIZE = 1024
CLIP_L = XL + "0.transformer."
BIG_G = {"sdxl": XL + "1.model.", "sdxl_refiner": XL + "0.model."}
TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}
# diffusers' SDXL scheduler_config.json (and its single-file default for XL): Euler on SD's scaled_linear betas.
EULER = dict(_class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
             beta_schedule="scaled_linear", prediction_type="epsilon", interpolation_type="linear",
             use_karras_sigmas=False, timestep_spacing="leading", steps_offset=1, sample_max_value=1.0,
             set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)


def detect(state: dict, *, prediction_type: str = "epsilon", head_channels: int = HEAD_CHANNELS,
           unet_overrides: dict | None = None, vae_overrides: dict | None = None,
           text_overrides: dict | None = None, text_2_overrides: dict | None = None) -> dict:
    """The family ("sdxl" or "sdxl_refiner") and diffusers-style configs of an SGM checkpoint's state dict:
    {"family", "ema", "unet_config", "vae_config", "text_config" (None for the refiner), "text_2_config",
    "scheduler_config", "pipeline_config"}. The ``*_overrides`` dicts are merged over the results."""
    family = model_type(state)
    if family not in TIME_IDS:
        raise ValueError(f"an SD {family[2]}.x checkpoint, not SDXL: load it with sdcore.loading.single_file "
                         "(StableDiffusionPipeline.from_single_file)")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    base = family == "sdxl"
    if base and not ldm.has_prefix(state, CLIP_L):
        raise ValueError(f"SDXL base checkpoint without its first text encoder: missing tensors: {CLIP_L}* "
                         f"(CLIP ViT-L, next to {BIG_G[family]}*)")
    get_tensor(state, BIG_G[family] + "text_projection")  # the pooled embedding's: required here, unlike SD 2.x
    text = {**ldm.text_config(state, CLIP_L, False, head_channels), **(text_overrides or {})} if base else None
    text_2 = {**ldm.text_config(state, BIG_G[family], True, head_channels), **(text_2_overrides or {})}
    vae = {**ldm.vae_config(state, IMAGE_SIZE, SCALING_FACTOR), "force_upcast": True, **(vae_overrides or {})}
    unet = ldm.unet_config(state, None, head_channels)
    unet.update(sample_size=IMAGE_SIZE // 2 ** (len(vae["block_out_channels"]) - 1), upcast_attention=False,
                **_text_time(state, family, text_2["projection_dim"]), **(unet_overrides or {}))
    check_sizes(unet, vae, (text["hidden_size"] if base else 0) + text_2["hidden_size"], "SDXL")
    return dict(family=family, ema=ldm.has_prefix(state, "model_ema.diffusion_model"), unet_config=unet, vae_config=vae,
                text_config=text, text_2_config=text_2, scheduler_config={**EULER, "prediction_type": prediction_type},
                pipeline_config=dict(requires_aesthetics_score=not base, force_zeros_for_empty_prompt=base))


def _text_time(state: dict, family: str, pooled: int) -> dict:
    """The UNet's "text_time" added embedding: its input is the pooled text embedding followed by one
    sinusoidal embedding of addition_time_embed_dim per time id, so that width is read off the first layer."""
    width = get_tensor(state, UNET + "label_emb.0.0.weight").shape[1]
    n = TIME_IDS[family]
    per_id, rest = divmod(width - pooled, n)
    if rest or per_id < 1:
        raise ValueError(f"the UNet's added embedding (label_emb) takes {width} inputs, which is not the pooled "
                         f"text width {pooled} plus {n} time ids of one width (SDXL {'base' if n == 6 else 'refiner'})")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=per_id,
                projection_class_embeddings_input_dim=width)


def load_components(path, *, prediction_type: str = "epsilon", use_ema: bool = False, device=None, dtype=None,
                    state: dict | None = None, **detect_kwargs) -> dict:
    """A single-file SDXL base or refiner checkpoint as plain dicts: {"family", "unet_config", "unet_state",
    "vae_config", "vae_state", "text_config", "text_state" (both None for the refiner), "text_2_config",
    "text_2_state", "scheduler_config", "pipeline_config"}; errors name the file. ``state``: its tensors when
    already read (read_checkpoint; ``model_type`` says which loader), ``path`` then only names it in errors.
    ``detect_kwargs``: head_channels and the overrides of ``detect``."""
    state = read_checkpoint(path) if state is None else state
    try:
        info = detect(state, prediction_type=prediction_type, **detect_kwargs)
        base = info["family"] == "sdxl"
        out = dict(family=info["family"], unet_config=info["unet_config"],
                   unet_state=convert_unet(state, info["unet_config"], use_ema=use_ema),
                   vae_config=info["vae_config"], vae_state=ldm.convert_vae(state, info["vae_config"]),
                   text_config=info["text_config"],
                   text_state=ldm.convert_clip(state, info["text_config"], prefix=CLIP_L) if base else None,
                   text_2_config=info["text_2_config"],
                   text_2_state=ldm.convert_open_clip(state, info["text_2_config"], prefix=BIG_G[info["family"]],
                                                      projection=True),
                   scheduler_config=info["scheduler_config"], pipeline_config=info["pipeline_config"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    warn_unconsumed(state, (UNET, VAE, BIG_G[out["family"]]) + ((CLIP_L,) if base else ()))
    return cast(out, ("unet_state", "vae_state", "text_state", "text_2_state"), device, dtype)
