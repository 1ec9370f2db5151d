"""The backend switch: which implementation every sdcore op (and so every model) runs on.

- ``kernels``: sdcore's compiled CPU/CUDA kernels (the default when the extension is built);
- ``torch``: PyTorch built-ins (scaled_dot_product_attention, group_norm + silu, an unfused step) —
  what diffusers runs, the peer we benchmark against;
- ``reference``: plain, readable math in :mod:`sdcore.reference`, the validation path.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

BACKENDS = ("kernels", "torch", "reference")

log = logging.getLogger("sdcore")

_state = threading.local()
_default: str | None = None
_warned: set[tuple[str, str]] = set()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown sdcore backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def default_backend() -> str:
    """$SDCORE_BACKEND if set, else ``kernels`` when the extension is built, else ``torch``."""
    global _default
    if _default is None:
        env = os.environ.get("SDCORE_BACKEND", "").strip()
        if env:
            _default = _check(env)
        else:
            from . import _ext

            _default = "kernels" if _ext.load_error() is None else "torch"
    return _default


def get_backend() -> str:
    """The backend ops use now in this thread."""
    return getattr(_state, "name", None) or default_backend()


def set_backend(name: str) -> None:
    """Switch every op (and model) in this thread to ``name`` until changed again."""
    _state.name = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with sdcore.use_backend("reference"): ...`` — run a block on another backend."""
    previous = getattr(_state, "name", None)
    _state.name = _check(name)
    try:
        yield
    finally:
        _state.name = previous


def note_fallback(op: str, reason: str) -> None:
    """Log (once per op and reason) that ``kernels`` could not serve an input and ``torch`` ran instead."""
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        log.warning("sdcore.%s: kernels backend can't serve this input (%s); falling back to torch", op, reason)
