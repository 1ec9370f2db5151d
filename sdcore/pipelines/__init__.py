"""sdcore's pipelines: Stable Diffusion 1.x / 2.x and SDXL, text-to-image and image-to-image, with diffusers'
names and call signatures. What they share (seeds, guidance, the loop, decode, LoRA) is in ``base``."""
from .base import DiffusionPipeline, NonFiniteError, PipelineOutput, StopDenoising
from .stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

__all__ = ["DiffusionPipeline", "NonFiniteError", "StopDenoising", "PipelineOutput", "StableDiffusionImg2ImgPipeline",
           "StableDiffusionPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"]
