"""From an A1111 request to a Plan the worker can run: every value checked against the server's limits, the
sampler resolved, LoRA tags parsed from the prompt and looked up in --lora-dir, the init image decoded, and
every field that asks for something sdcore doesn't do refused, all before the job is queued. Each problem
is one entry of a 422 in FastAPI's shape, ``{"detail": [{"loc": ["body", field], "msg": ..., ...}]}``,
which is what A1111 (also FastAPI) answers for a bad request."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import random
import re
from typing import Any

from .. import args as ranges
from . import files, samplers
from .schemas import UNSUPPORTED, Img2ImgRequest

# A1111's extra-network syntax: <type:arguments> (sd-webui modules/extra_networks.py).
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")
DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


@dataclasses.dataclass
class Limits:
    """What one request may ask for (sdcore serve's --max-* options)."""

    max_steps: int = 150
    max_side: int = 2048
    max_batch_pixels: int = 4 * 1024 * 1024  # width x height x batch_size
    max_n_iter: int = 100


@dataclasses.dataclass
class Plan:
    kind: str                  # "txt2img" or "img2img"
    prompt: str                # as sent, LoRA tags included (the infotext keeps them, as A1111's does)
    clean_prompt: str          # what the text encoder sees
    negative_prompt: str
    loras: list                # [(files.Entry, weight)]
    seed: int
    batch_size: int
    n_iter: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler_name: str          # A1111's
    scheduler: str             # sdcore's
    eta: float                 # DDIM's eta (0 for the others)
    clip_skip: int | None
    checkpoint: str | None     # override_settings' sd_model_checkpoint
    strength: float | None = None
    init_image: Any = None
    send_images: bool = True
    save_images: bool = False
    options_after: dict | None = None  # options to keep after the job (override_settings_restore_afterwards=False)
    parameters: dict = dataclasses.field(default_factory=dict)  # the request, echoed as A1111 does


class Invalid(Exception):
    """One or more 422 entries in FastAPI's validation-error shape."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors))
        self.errors = errors


def error(field, msg: str, value=None) -> dict:
    loc = ["body", *field] if isinstance(field, (list, tuple)) else ["body", field]
    return {"type": "value_error", "loc": loc, "msg": msg, "input": value}


class _Errors:
    def __init__(self):
        self.items = []

    def add(self, field, msg, value=None):
        self.items.append(error(field, msg, value))

    def check_int(self, field: str, value, lo: int, hi: int):
        try:
            return ranges.check_int(field, value, lo, hi)
        except (TypeError, ValueError) as exc:
            self.add(field, str(exc), value)
            return None

    def check(self, key: str, field: str, value, lo=None, hi=None, loc=None):
        """``value`` against RANGES[key] narrowed to [lo, hi]; an entry naming ``field`` (at ``loc``, default
        the field) if out of range."""
        low, high = ranges.RANGES[key]
        low, high = low if lo is None else max(low, lo), high if hi is None else min(high, hi)
        check = ranges.check_int if isinstance(low, int) else ranges.check_float
        try:
            return check(field, value, low, high)
        except (TypeError, ValueError) as exc:
            self.add(loc or field, str(exc), value)
            return None


def parse_loras(prompt: str, lora_dir, errors: _Errors, apply: bool = True) -> tuple[str, list]:
    """The prompt without its <lora:name:weight> tags, and the LoRAs they name (name resolved in --lora-dir).
    A1111's weight defaults to 1; its two-weight form (text encoder, UNet) is taken only with equal weights."""
    loras, seen = [], set()
    for kind, arguments in EXTRA_NETWORK.findall(prompt):
        if kind not in LORA_TYPES:
            errors.add("prompt", f"<{kind}:...>: only <lora:name:weight> extra networks are supported", prompt)
            continue
        if not apply:
            continue
        name, *weights = arguments.split(":")
        try:
            values = [float(w) for w in weights] or [1.0]
        except ValueError:
            errors.add("prompt", f"<{kind}:{arguments}>: the weight must be a number", prompt)
            continue
        if len(set(values)) > 1:
            errors.add("prompt", f"<{kind}:{arguments}>: separate text-encoder and UNet weights are not "
                                 "supported; give one weight", prompt)
            continue
        weight = errors.check("lora_weight", f"<{kind}:{arguments}> weight", values[0], loc="prompt")
        if name in seen:
            errors.add("prompt", f"LoRA {name!r} is named twice", prompt)
            continue
        seen.add(name)
        if lora_dir is None:
            errors.add("prompt", f"LoRA {name!r}: the server has no --lora-dir", prompt)
            continue
        try:
            entry = files.find(files.loras(lora_dir), name, "LoRA")
        except ValueError as exc:
            errors.add("prompt", str(exc), prompt)
            continue
        if weight is not None:
            loras.append((entry, weight))
    return EXTRA_NETWORK.sub("", prompt), loras


def decode_image(text, field, errors: _Errors, max_pixels: int):
    """A base64 image (with or without a data: URL prefix) as an RGB PIL image, or None and an entry."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str):
        errors.add(field, "must be a base64 string", None)
        return None
    try:
        data = base64.b64decode(DATA_URL.sub("", text.strip(), count=1), validate=True)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:  # checked from the header, before decoding the pixels
            errors.add(field, f"the image is {image.width}x{image.height}, over the {max_pixels} pixels allowed")
            return None
        return image.convert("RGB")
    except (binascii.Error, ValueError):
        errors.add(field, "is not valid base64")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        errors.add(field, f"is not an image PIL can read ({type(exc).__name__})")
    return None


def _refuse_unsupported(req, errors: _Errors) -> None:
    for field, (allowed, why) in UNSUPPORTED.items():
        if field in type(req).model_fields and getattr(req, field) not in allowed:
            errors.add(field, why, getattr(req, field))
    if req.subseed_strength != 0:
        errors.add("subseed_strength", "variation seeds are not supported", req.subseed_strength)
    if req.seed_resize_from_h > 0 and req.seed_resize_from_w > 0:
        errors.add("seed_resize_from_h", "resizing the seed is not supported", req.seed_resize_from_h)


def _sampler(req, options: dict, errors: _Errors):
    try:
        title, scheduler = samplers.resolve(req.sampler_name, req.sampler_index, req.scheduler)
    except samplers.SamplerError as exc:
        errors.add(exc.field, str(exc), getattr(req, exc.field))
        return None, None, 0.0
    # eta as A1111 reads it: the request's, else the option; DDIM's eta, or Euler a's ancestral noise
    # multiplier (sdcore runs that only at 1); the other samplers ignore it, as A1111's do.
    eta = 0.0
    if title == "DDIM":
        eta = errors.check("eta", "eta", options["eta_ddim"] if req.eta is None else req.eta) or 0.0
    elif title == "Euler a":
        multiplier = options["eta_ancestral"] if req.eta is None else req.eta
        if multiplier != 1:
            errors.add("eta", "Euler a runs with its full ancestral noise only (eta 1)", multiplier)
    return title, scheduler, eta


def build(req, kind: str, *, options: dict, limits: Limits, lora_dir, find_model, default_size=None) -> Plan:
    """The Plan for a validated request body, or Invalid with every problem found. ``find_model(name)``
    raises ValueError for a checkpoint that isn't available."""
    from . import options as opts

    errors = _Errors()
    _refuse_unsupported(req, errors)
    settings = {**options}
    for key, value in (req.override_settings or {}).items():
        problem = opts.check(key, value)
        if not problem and key == "sd_model_checkpoint":
            try:
                value = find_model(value)
            except ValueError as exc:
                problem = str(exc)
        if problem:
            errors.add(["override_settings", key], problem, value)
        else:
            settings[key] = value
    title, scheduler, eta = _sampler(req, settings, errors)
    steps = errors.check("steps", "steps", req.steps, hi=limits.max_steps)
    batch = errors.check("images", "batch_size", req.batch_size)
    n_iter = errors.check_int("n_iter", req.n_iter, 1, limits.max_n_iter)
    cfg = errors.check("guidance", "cfg_scale", req.cfg_scale)
    width, height = req.width, req.height
    if default_size and "width" not in req.model_fields_set and "height" not in req.model_fields_set:
        width, height = default_size  # sdcore serve --size: the size of requests that give none
    for field, side in (("width", width), ("height", height)):
        if errors.check("side", field, side, hi=limits.max_side) is not None and side % 8:
            errors.add(field, f"must be a multiple of 8, got {side}", side)
    if batch and width * height * batch > limits.max_batch_pixels:
        errors.add("batch_size", f"width x height x batch_size is {width * height * batch}, over this "
                                 f"server's limit of {limits.max_batch_pixels} pixels per batch", batch)
    count = (batch or 1) * (n_iter or 1)
    seed = req.seed
    if seed == -1:
        seed = random.randrange(2**32)
    else:
        errors.check("seed", "seed", seed, hi=ranges.RANGES["seed"][1] - count + 1)  # seed + i must fit
    clean, loras = parse_loras(req.prompt, lora_dir, errors, apply=not req.disable_extra_networks)
    plan = dict(prompt=req.prompt, clean_prompt=clean, negative_prompt=req.negative_prompt, loras=loras,
                seed=seed, batch_size=batch, n_iter=n_iter, steps=steps, cfg_scale=cfg, width=width,
                height=height, sampler_name=title, scheduler=scheduler, eta=eta,
                clip_skip=settings["CLIP_stop_at_last_layers"] - 1 or None,
                checkpoint=settings["sd_model_checkpoint"],
                send_images=req.send_images, save_images=req.save_images)
    if not req.override_settings_restore_afterwards and req.override_settings:
        plan["options_after"] = {key: settings[key] for key in req.override_settings}
    if isinstance(req, Img2ImgRequest):
        plan.update(_img2img(req, errors, steps, width, height, limits))
    if errors.items:
        raise Invalid(errors.items)
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = None  # as A1111: echoed only when asked for
    return Plan(kind=kind, parameters=parameters, **plan)


def _img2img(req, errors: _Errors, steps, width, height, limits: Limits) -> dict:
    from PIL import Image

    strength = errors.check("strength", "denoising_strength", 0.75 if req.denoising_strength is None
                            else req.denoising_strength)
    if strength is not None and steps and int(steps * strength) == 0:
        errors.add("denoising_strength", f"{strength} x {steps} steps leaves no step to run", strength)
    images = req.init_images or []
    if len(images) != 1:
        errors.add("init_images", f"one init image is needed, got {len(images)}", None)
        return {"strength": strength}
    image = decode_image(images[0], ["init_images", 0], errors, limits.max_side ** 2)
    if image is not None and not errors.items and image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)  # A1111's resize_mode 0, just resize
    return {"strength": strength, "init_image": image}
