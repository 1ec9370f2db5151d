"""A1111's /sdapi/v1 request bodies: the field names, types and defaults of AUTOMATIC1111 1.10's
StableDiffusionTxt2ImgProcessingAPI and StableDiffusionImg2ImgProcessingAPI, so that the payloads its clients
send parse unchanged. As in A1111, unknown fields are ignored (clients written for newer versions send
more); every known field is either used or checked by sdcore.serve.requests, which refuses the ones asking
for a feature sdcore lacks. Types are checked here (FastAPI answers 422 with pydantic's errors); values
are checked against the server's limits in sdcore.serve.requests."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    force_task_id: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: Optional[str] = None


class Txt2ImgRequest(_Common):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Common):
    init_images: Optional[list[str]] = None
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False
    denoising_strength: Optional[float] = 0.75


# What each request may set only to these values (or leave unset): the feature sdcore lacks, named in the 422.
# An entry "when" another field holds a value applies only then (hires sizes matter only with enable_hr).
UNSUPPORTED = {
    "enable_hr": ((False,), "hires fix is not supported; generate at the final size instead"),
    "restore_faces": ((None, False), "face restoration is not supported"),
    "tiling": ((None, False), "tiling is not supported"),
    "styles": ((None, []), "prompt styles are not supported; put the style's text in the prompt"),
    "s_min_uncond": ((None, 0, 0.0), "skipping early guidance (s_min_uncond) is not supported"),
    "s_churn": ((None, 0, 0.0), "stochastic churn (s_churn) is not supported"),
    "s_noise": ((None, 1, 1.0), "a noise multiplier (s_noise) other than 1 is not supported"),
    "refiner_checkpoint": ((None, "", "None"), "a refiner model is not supported"),
    "script_name": ((None, ""), "scripts are not supported (GET /sdapi/v1/scripts lists none)"),
    "alwayson_scripts": (({},), "scripts (ControlNet, ADetailer, ...) are not supported"),
    "infotext": ((None, ""), "filling a request from an infotext is not supported; send the fields"),
    "mask": ((None, ""), "inpainting (a mask) is not supported"),
    "latent_mask": ((None, ""), "inpainting (a latent mask) is not supported"),
    "resize_mode": ((0,), "only resize_mode 0 (just resize) is supported"),
    "initial_noise_multiplier": ((None, 1, 1.0), "an initial noise multiplier other than 1 is not supported"),
}
