"""The A1111 options sdcore serve has (GET/POST /sdapi/v1/options, and a request's override_settings).

Only options that change what sdcore does are listed; setting any other one is refused, naming it, since
accepting it would promise an effect that never happens. Reading gives these, with their current values."""
from __future__ import annotations

import numbers

DEFAULTS = {
    "sd_model_checkpoint": None,        # the model's title (GET /sdapi/v1/sd-models)
    "CLIP_stop_at_last_layers": 1,      # A1111's "Clip skip": 1 = the last layer (sdcore's clip_skip + 1)
    "eta_ddim": 0.0,                    # DDIM's eta when a request gives none
    "eta_ancestral": 1.0,               # Euler a's noise multiplier; sdcore runs only 1
    "samples_format": "png",
    "sd_vae": "Automatic",              # the model's own VAE
}


def _number(value, lo, hi, integer=False) -> str | None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        return f"must be {'an integer' if integer else 'a number'} in {lo}..{hi}, got {value!r}"
    return None


def check(key: str, value) -> str | None:
    """Why ``value`` can't be set for option ``key`` here, or None. A checkpoint's type only: the caller looks
    the model up."""
    if key == "sd_model_checkpoint":
        return None if isinstance(value, str) and value else "must be a model title (GET /sdapi/v1/sd-models)"
    if key == "CLIP_stop_at_last_layers":
        return _number(value, 1, 12, integer=True)
    if key == "eta_ddim":
        return _number(value, 0.0, 1.0)
    if key == "eta_ancestral":
        return None if value == 1 and not isinstance(value, bool) else "sdcore runs Euler a only with eta 1"
    if key == "samples_format":
        return None if value == "png" else "sdcore serve writes PNG only"
    if key == "sd_vae":
        return None if value in ("Automatic", "None") else "only the model's own VAE (Automatic) is supported"
    return f"option {key!r} is not one sdcore serve has; it has {', '.join(DEFAULTS)}"
