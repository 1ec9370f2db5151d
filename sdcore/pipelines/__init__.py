"""sdcore's pipelines: Stable Diffusion 1.x / 2.x and SDXL, text-to-image and image-to-image, with diffusers'
names and call signatures. What they share (seeds, guidance, the loop, decode, LoRA) is in ``base``."""
from .base import DiffusionPipeline, NonFiniteError, PipelineOutput, StopDenoising
from .stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

__all__ = ["from_single_file", "DiffusionPipeline", "NonFiniteError", "StopDenoising", "PipelineOutput", "StableDiffusionImg2ImgPipeline",
           "StableDiffusionPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"]


def from_single_file(path, device=None, dtype=None, backend: str | None = None, img2img: bool = False, **kwargs):
    """A single-file checkpoint in whichever pipeline its tensors call for, read once: SD 1.x / 2.x ->
    StableDiffusionPipeline, SDXL base -> StableDiffusionXLPipeline, SDXL refiner ->
    StableDiffusionXLImg2ImgPipeline (``img2img``: the image-to-image class of each). ``kwargs`` go to that
    class's ``from_single_file``."""
    from ..loading import single_file

    state = single_file.read_checkpoint(path)
    try:
        family = single_file.model_type(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if family in ("sd1", "sd2"):
        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    else:
        cls = StableDiffusionXLImg2ImgPipeline if img2img or family == "sdxl_refiner" else StableDiffusionXLPipeline
    return cls.from_single_file(path, device=device, dtype=dtype, backend=backend, state=state, **kwargs)
