"""Original LDM/CompVis single-file Stable Diffusion checkpoints (SD 1.x and 2.x, .safetensors or .ckpt) as
diffusers-named components: configs read off the tensors, state dicts renamed through ldm.py's tables.
``model_type`` tells SD 1.x, 2.x, SDXL and the SDXL refiner apart; SDXL files load through single_file_xl.

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
(``betas``, ``alphas_cumprod``...), SGM's ``denoiser.*``, ``global_step``, ``epoch``. Any other key outside
the components is dropped with a warning; inside a component's prefix every key must be converted and every
expected key present, or a ValueError names them."""
from __future__ import annotations

import logging
import re

from . import ldm
from .files import read_state_dict
from .ldm import CLIP, OPEN_CLIP, UNET, VAE, convert_open_clip, has_prefix

log = logging.getLogger(__name__)

EMA = "model_ema."
XL = "conditioner.embedders."  # SDXL's text encoders (Stability's SGM layout), see single_file_xl
SD1_NUM_HEADS = 8
HEAD_CHANNELS = 64
SCALING_FACTOR = 0.18215
SD2_BASE_GLOBAL_STEP = 875000
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# DDPM's schedule buffers (LDM), SGM's denoiser sigmas, training counters and LitEma's copies.
_OUTSIDE_IGNORED = re.compile(r"(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|"
                              r"logvar|lvlb_weights|global_step|epoch|model_ema\..*|denoiser\..*)$")
MODEL_TYPES = ("sd1", "sd2", "sdxl", "sdxl_refiner")


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


def model_type(state: dict) -> str:
    """Which model a checkpoint's tensors are: "sd1" (OpenAI CLIP), "sd2" (OpenCLIP), "sdxl" (CLIP-L and
    OpenCLIP bigG) or "sdxl_refiner" (OpenCLIP bigG alone), from where its text encoders are; a ValueError
    says what was expected otherwise."""
    if not has_prefix(state, UNET):
        prefixes = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"not an LDM/CompVis Stable Diffusion checkpoint: expected the UNet under '{UNET}*' "
                         f"(with '{VAE}*' and 'cond_stage_model.*' or 'conditioner.*'); top-level names found: "
                         f"{prefixes[:10]}")
    if has_prefix(state, OPEN_CLIP + "token_embedding."):
        return "sd2"
    if has_prefix(state, CLIP):
        return "sd1"
    if has_prefix(state, XL + "1.model."):
        return "sdxl"
    if has_prefix(state, XL + "0.model."):
        return "sdxl_refiner"
    found = sorted({".".join(k.split(".")[:4]) for k in state if k.startswith(XL)})
    raise ValueError(f"no text encoder: expected '{CLIP}*' (SD 1.x, OpenAI CLIP), '{OPEN_CLIP}*' (SD 2.x, "
                     f"OpenCLIP), '{XL}0.transformer.*' with '{XL}1.model.*' (SDXL) or '{XL}0.model.*' (SDXL "
                     f"refiner)" + (f"; found {found[:6]}" if found else ""))


def _ema_name(key: str) -> str:
    """LitEma's flattened name: model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_
    blocks00weight."""
    return EMA + key[len("model."):].replace(".", "")


def _unet_view(state: dict, use_ema: bool) -> dict:
    """The UNet's tensors under their model.diffusion_model.* names: the EMA copies where asked for and present."""
    keys = [k for k in state if k.startswith(UNET)]
    if not (use_ema and has_prefix(state, EMA + "diffusion_model")):
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
    family = model_type(state)
    if family not in ("sd1", "sd2"):
        raise ValueError(f"an SDXL {'refiner ' if family == 'sdxl_refiner' else ''}checkpoint, not SD 1.x / 2.x: "
                         "load it with sdcore.loading.single_file_xl (StableDiffusionXLPipeline.from_single_file)")
    sd2 = family == "sd2"
    text = {**ldm.text_config(state, OPEN_CLIP if sd2 else CLIP, sd2, head_channels, drop_last=sd2),
            **(text_overrides or {})}
    if prediction_type is None:
        v_pred = sd2 and int(state.get("global_step", -1)) != SD2_BASE_GLOBAL_STEP
        prediction_type = "v_prediction" if v_pred else "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    v_pred = prediction_type == "v_prediction"
    image_size = 768 if sd2 and v_pred else 512

    vae = {**ldm.vae_config(state, image_size, SCALING_FACTOR), **(vae_overrides or {})}
    heads = num_heads if num_heads is not None else (None if sd2 else SD1_NUM_HEADS)
    unet = ldm.unet_config(state, heads, head_channels)
    unet.update(sample_size=image_size // 2 ** (len(vae["block_out_channels"]) - 1),
                upcast_attention=sd2 and v_pred, **(unet_overrides or {}))
    check_sizes(unet, vae, text["hidden_size"], "SD 1.x / 2.x")
    scheduler = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type=prediction_type, steps_offset=1,
                     skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
    return dict(family=family, ema=has_prefix(state, EMA + "diffusion_model"), unet_config=unet, vae_config=vae,
                text_config=text, scheduler_config=scheduler)


def check_sizes(unet: dict, vae: dict, text_width: int, what: str) -> None:
    """The UNet takes the VAE's latents (not an inpainting UNet's) and cross-attends to the text's width."""
    if unet["in_channels"] != vae["latent_channels"]:
        kind = "an inpainting" if unet["in_channels"] == vae["latent_channels"] * 2 + 1 else "a non-text-to-image"
        raise ValueError(f"{kind} UNet ({unet['in_channels']} input channels for {vae['latent_channels']} latent "
                         f"channels) is not supported: only text-to-image {what} checkpoints")
    if unet["cross_attention_dim"] != text_width:
        raise ValueError(f"the UNet cross-attends to width {unet['cross_attention_dim']} but the text encoder's "
                         f"width is {text_width}")


# ---------------------------------------------------------------------------------------------- converters
def convert_unet(state: dict, config: dict, *, use_ema: bool = False) -> dict:
    """model.diffusion_model.* (or the model_ema.* copies, when use_ema and present) -> diffusers UNet names."""
    return ldm.apply(_unet_view(state, use_ema), UNET, ldm.unet_table(config), "UNet")


def convert_vae(state: dict, config: dict | None = None) -> dict:
    """first_stage_model.* -> diffusers AutoencoderKL names (config: detect()'s vae_config, else read here)."""
    return ldm.convert_vae(state, config or ldm.vae_config(state, 512, SCALING_FACTOR))


def convert_clip(state: dict, config: dict | None = None) -> dict:
    """OpenAI CLIP under cond_stage_model.transformer.* -> CLIPTextModel names (config: read here if None)."""
    return ldm.convert_clip(state, config or ldm.text_config(state, CLIP, False, HEAD_CHANNELS))


# ---------------------------------------------------------------------------------------------- loading
def warn_unconsumed(state: dict, consumed: tuple) -> None:
    left = sorted({k.split(".")[0] for k in state if not k.startswith(consumed) and not _OUTSIDE_IGNORED.match(k)})
    if left:
        log.warning("single-file checkpoint: ignoring tensors outside Stable Diffusion's components: %s", left)


def cast(out: dict, keys: tuple, device, dtype) -> dict:
    """The state dicts under ``keys`` moved to ``device`` and their float tensors cast to ``dtype``."""
    if device is not None or dtype is not None:
        for key in keys:
            if out[key] is not None:
                out[key] = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                            for k, v in out[key].items()}
    return out


def load_components(path, *, prediction_type: str | None = None, use_ema: bool = False, device=None, dtype=None,
                    state: dict | None = None, **detect_kwargs) -> dict:
    """A single-file SD 1.x / 2.x checkpoint as plain dicts: {"family", "unet_config", "unet_state",
    "vae_config", "vae_state", "text_config", "text_state", "scheduler_config"}; errors name the file.
    ``state``: its tensors when already read (read_checkpoint), ``path`` then only names it in errors.
    ``detect_kwargs``: num_heads, head_channels, unet_overrides, vae_overrides, text_overrides (see detect)."""
    state = read_checkpoint(path) if state is None else state
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
    warn_unconsumed(state, (UNET, VAE, OPEN_CLIP if sd2 else CLIP))
    return cast(out, ("unet_state", "vae_state", "text_state"), device, dtype)
