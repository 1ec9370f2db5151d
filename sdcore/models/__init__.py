"""sdcore's models: readable, paper-like modules with diffusers' parameter names and config keys."""
from .text_encoder import load_text_encoder
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["AutoencoderKL", "UNet2DConditionModel", "load_text_encoder"]
