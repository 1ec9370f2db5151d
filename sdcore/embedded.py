"""The embedded default model: Stable Diffusion's architecture with random weights, built deterministically
by the package, so `sdcore generate`, `make demo` and the benchmarks run with no download. Its images are
structured noise, not pictures: pass a real model with --model (a diffusers folder or a .safetensors file).

``tiny`` is small enough for a CPU demo; ``sd15`` and ``sd21`` are the full-size SD 1.5 and SD 2.1 (768,
v-prediction) networks, for timing. ``sdxl`` is the full-size SDXL base (1024, two text encoders) and
``tiny-xl`` its miniature, which runs the SDXL pipeline in seconds."""
from __future__ import annotations

import torch

from . import loading

ARCHS = ("tiny", "sd15", "sd21", "tiny-xl", "sdxl")

_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

CONFIGS = {
    "tiny": dict(
        unet=dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                  cross_attention_dim=32, norm_num_groups=8),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=256, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=32),
        scheduler=dict(_SD_SCHEDULE, _class_name="PNDMScheduler")),
    "sd15": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, attention_head_dim=8,
                  cross_attention_dim=768),
        vae=dict(_SD_VAE, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
        scheduler=dict(_SD_SCHEDULE, _class_name="PNDMScheduler")),
    "tiny-xl": dict(
        unet=dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
                  transformer_layers_per_block=(1, 2), cross_attention_dim=64, norm_num_groups=8,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=256, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=32),
        text_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=32),
        scheduler=dict(_SD_SCHEDULE, _class_name="EulerDiscreteScheduler")),
    "sd21": dict(
        unet=dict(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, attention_head_dim=(5, 10, 20, 20),
                  cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True),
        vae=dict(_SD_VAE, sample_size=768),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512),
        scheduler=dict(_SD_SCHEDULE, _class_name="DDIMScheduler", prediction_type="v_prediction")),
    "sdxl": dict(  # stabilityai/stable-diffusion-xl-base-1.0's configs
        unet=dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                  layers_per_block=2, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), attention_head_dim=(5, 10, 20),
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280),
        scheduler=dict(_SD_SCHEDULE, _class_name="EulerDiscreteScheduler")),
}


def is_xl(arch: str) -> bool:
    return "text_2" in CONFIGS.get(arch, {})


def build(arch: str = "tiny", device=None, dtype=None, backend: str | None = None, seed: int = 0):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for the XL archs) in ``arch`` with random weights
    drawn from ``seed`` (the same on every run)."""
    from .models import AutoencoderKL, UNet2DConditionModel
    from .models.text_encoder import build_text_encoder
    from .pipelines import StableDiffusionPipeline, StableDiffusionXLPipeline
    from .pipelines.base import _scheduler_from_config

    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    cfg = CONFIGS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfg["unet"]).eval()
        vae = AutoencoderKL.from_config(cfg["vae"]).eval()
        text_encoder = build_text_encoder(cfg["text"])
        text_encoder_2 = build_text_encoder(cfg["text_2"], with_projection=True) if is_xl(arch) else None
    scheduler = _scheduler_from_config(cfg["scheduler"], f"embedded {arch}")
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(vae, text_encoder, text_encoder_2, loading.default_tokenizer(),
                                         loading.default_tokenizer(pad_token="!"), unet, scheduler, backend=backend)
    else:
        pipe = StableDiffusionPipeline(unet, vae, text_encoder, loading.default_tokenizer(), scheduler,
                                       backend=backend)
    return pipe.to(device, dtype)


def describe(arch: str) -> str:
    kind = "SDXL" if is_xl(arch) else "Stable Diffusion"
    return (f"embedded default model ({arch}: {kind} architecture with RANDOM weights, so the image "
            "is noise, not a picture). For real images pass --model DIR (a diffusers folder) or "
            "--model FILE.safetensors (an original SD 1.x/2.x or SDXL checkpoint).")


__all__ = ["ARCHS", "CONFIGS", "build", "describe", "is_xl"]
