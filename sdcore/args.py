"""Range checks for every number a user hands sdcore, shared by the Python API and the ``sdcore`` command so
both refuse the same values with the same words, before any work: NaN, Inf, zero, negatives, sizes, counts,
seeds and strengths. Each error names the argument and the allowed range.

The ranges live here once; the CLI's ``--help`` prints them from the same table."""
from __future__ import annotations

import argparse
import math
import numbers

# name: (low, high) inclusive. Integers where both ends are ints.
RANGES = {
    "steps": (1, 1000),            # and never more than the model's num_train_timesteps
    "guidance": (0.0, 100.0),      # classifier-free guidance scale; <= 1 turns guidance off, as in diffusers
    "guidance_rescale": (0.0, 1.0),
    "images": (1, 64),             # images per prompt
    "seed": (0, 2**63 - 1),        # image i uses seed + i, so seed + images - 1 must fit too
    "side": (8, 8192),             # image width / height in pixels (and a multiple of the VAE's factor)
    "strength": (0.0, 1.0),
    "eta": (0.0, 1.0),
    "clip_skip": (0, 48),          # and fewer than the text encoder's layers
    "batch": (1, 64),
    "workers": (1, 4096),          # sdcore batch --workers
    "threads": (1, 1024),          # sdcore batch --threads (CPU intra-op threads per worker)
    "lora_weight": (-10.0, 10.0),  # an adapter's weight (A1111's <lora:name:weight>); negative inverts it
}


def describe(lo, hi) -> str:
    return f"{lo}..{hi}" if isinstance(lo, int) else f"[{lo:g}, {hi:g}]"


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi], or a TypeError / ValueError naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer{_range_words(lo, hi)}, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer{_range_words(lo, hi)}, got {value}")
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float in [lo, hi], or a TypeError / ValueError naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number{_range_words(lo, hi)}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be a finite number{_range_words(lo, hi)}, got {value}")
    return value


def checked(key: str, name: str, value):
    """``value`` checked against RANGES[key] (an int or a float range), the error naming ``name``."""
    lo, hi = RANGES[key]
    return check_int(name, value, lo, hi) if isinstance(lo, int) else check_float(name, value, lo, hi)


def _range_words(lo, hi) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" >= {lo:g}" if isinstance(lo, float) else f" >= {lo}"
    if lo is None:
        return f" <= {hi:g}" if isinstance(hi, float) else f" <= {hi}"
    return f" in {describe(lo, hi)}"


def cli_type(key: str):
    """An argparse ``type=`` for RANGES[key]: parses the text and range-checks it, so argparse prints
    ``argument --steps: must be an integer in 1..1000, got 0`` (the argument named, no traceback)."""
    lo, hi = RANGES[key]
    integer = isinstance(lo, int)

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind} in {describe(lo, hi)}, got {text!r}") from None
        try:
            return checked(key, "value", value)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value ", "", 1)) from None

    parse.__name__ = key  # argparse names the type in some messages
    return parse
