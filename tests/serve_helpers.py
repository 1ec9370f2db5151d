"""What the serve tests share: decoding the API's images, the payloads A1111 clients send, a free port."""
import base64
import io
import json
import socket

import numpy as np
from PIL import Image

FAST = dict(steps=2, width=64, height=64)  # the tiny model at 64x64: a fraction of a second per image


def image(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


def pixels(b64: str) -> np.ndarray:
    return np.asarray(image(b64).convert("RGB"))


def info(body: dict) -> dict:
    return json.loads(body["info"])


def png_b64(size=(64, 64), seed=0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The body the `webuiapi` client (mix1009/sdwebuiapi, WebUIApi.txt2img / img2img) sends when called with only
# a prompt: every field it knows, at its defaults (sampler "Euler a", eta 1.0, hires off, ...). The tests
# change only the size and steps, to stay fast on the CPU.
WEBUIAPI_TXT2IMG = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "prompt": "a cat", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "scheduler": None,
    "batch_size": 1, "n_iter": 1, "steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
    "script_name": None, "send_images": True, "save_images": False, "alwayson_scripts": {},
    "sampler_index": "Euler a",
}
WEBUIAPI_IMG2IMG = {
    "init_images": [], "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": 1.5, "mask": None,
    "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0, "initial_noise_multiplier": 1, "prompt": "a cat", "styles": [], "seed": -1,
    "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
    "sampler_name": "Euler a", "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 30, "cfg_scale": 7.0,
    "width": 512, "height": 512, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
    "include_init_images": False, "script_name": None, "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "sampler_index": "Euler a",
}
