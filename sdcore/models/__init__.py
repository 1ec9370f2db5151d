"""sdcore's models: readable, paper-like modules with diffusers' parameter names and config keys."""
from .vae import AutoencoderKL

__all__ = ["AutoencoderKL"]
