"""The PEP 517 build backend named in pyproject.toml: setuptools' own, plus one check before a wheel is built.

sdcore._C is compiled against the torch it will run with, so torch is deliberately not a build requirement:
with pip's default build isolation the build would otherwise compile against whatever torch pip fetched
into a throw-away environment, and the extension would not load in the user's. When torch can't be
imported, a wheel build (`pip install`, `pip wheel`, `python -m build`) stops at its first hook with one
line saying what to run instead. An sdist needs no torch and builds anywhere.
"""
import os
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (build_sdist, get_requires_for_build_sdist, ...)

NO_TORCH = (
    "sdcore compiles its extension against your installed torch, and this build can't import torch "
    "(pip's build isolation hides it, or it isn't installed). Install torch, then run: "
    "pip install --no-build-isolation <the sdcore sdist, directory or git URL>  "
    "(python -m build: --no-isolation; SDCORE_CUDA=0 for a CPU-only build)"
)


def require_torch():
    """Exit with one line, not a traceback, when torch is needed and can't be imported."""
    if os.environ.get("SDCORE_SKIP_EXTENSION") == "1":
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(NO_TORCH)


def _torch_first(hook):
    def checked(*args, **kwargs):
        require_torch()
        return hook(*args, **kwargs)

    checked.__name__ = hook.__name__
    return checked


# The hooks that build (or first ask what building needs) check for torch; the sdist and metadata hooks don't.
get_requires_for_build_wheel = _torch_first(_setuptools.get_requires_for_build_wheel)
build_wheel = _torch_first(_setuptools.build_wheel)
get_requires_for_build_editable = _torch_first(_setuptools.get_requires_for_build_editable)
build_editable = _torch_first(_setuptools.build_editable)
