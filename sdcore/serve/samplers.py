"""A1111's sampler and scheduler names, mapped to sdcore's schedulers (sdcore.schedulers.NAMES).

A1111 (1.9 and later) splits a sampler into the algorithm ("DPM++ 2M") and the noise schedule ("Karras");
older clients send the combined name ("DPM++ 2M Karras") or a k-diffusion alias ("k_dpmpp_2m"). Each
algorithm sdcore has is listed with the schedules sdcore can run it on; "Automatic" is the schedule A1111
picks for that sampler by default (Karras for DPM++ 2M, the model's own spacing for the others). Anything
else is refused, naming the field, rather than silently run on another sampler."""
from __future__ import annotations

# A1111 name: (aliases, {A1111 schedule name: sdcore scheduler}, A1111's per-sampler options)
SAMPLERS = {
    "DPM++ 2M": (["k_dpmpp_2m"], {"automatic": "dpm++2m-karras", "karras": "dpm++2m-karras"},
                 {"scheduler": "karras"}),
    "Euler a": (["k_euler_a", "k_euler_ancestral"], {"automatic": "euler-a"}, {"uses_ensd": "True"}),
    "Euler": (["k_euler"], {"automatic": "euler"}, {}),
    "LMS": (["k_lms"], {"automatic": "lms"}, {}),
    "DDIM": (["ddim"], {"automatic": "ddim"}, {}),
    "PLMS": (["plms"], {"automatic": "pndm"}, {}),
}
# The DPM++ 2M schedule as A1111 < 1.9 named it, in one sampler name.
COMBINED = {"DPM++ 2M Karras": ("DPM++ 2M", "karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "karras")}

# A1111's schedulers (GET /sdapi/v1/schedulers): name, label. Only these two run here; the rest are listed by
# the error that refuses them.
SCHEDULERS = [("automatic", "Automatic"), ("karras", "Karras")]
A1111_SCHEDULERS = ("automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                    "kl_optimal", "align_your_steps", "simple", "normal", "ddim", "beta")

DEFAULT = "Euler"  # A1111's default sampler_index


class SamplerError(ValueError):
    """A sampler or schedule sdcore can't run: ``field`` is the request field to name in the 422."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _by_name(name: str) -> str | None:
    for title, (aliases, _, _) in SAMPLERS.items():
        if name == title or name in aliases:
            return title
    return None


def resolve(sampler_name: str | None, sampler_index: str | None, scheduler: str | None) -> tuple[str, str]:
    """(A1111 sampler name, sdcore scheduler name) for a request. ``sampler_name`` wins over
    ``sampler_index`` as in A1111; a missing one means "Euler"."""
    field = "sampler_name" if sampler_name else "sampler_index"
    name = sampler_name or sampler_index or DEFAULT
    schedule = (scheduler or "automatic").lower()
    if name in COMBINED:
        name, implied = COMBINED[name]
        if schedule not in ("automatic", implied):
            raise SamplerError("scheduler", f"scheduler {scheduler!r} contradicts sampler {name!r}")
        schedule = implied
    title = _by_name(name)
    if title is None:
        raise SamplerError(field, f"sampler {name!r} is not one sdcore has; choose one of "
                                  f"{', '.join([*SAMPLERS, *COMBINED])}")
    schedules = SAMPLERS[title][1]
    if schedule not in schedules:
        what = "is not an A1111 scheduler" if schedule not in A1111_SCHEDULERS else \
            f"is not one sdcore runs {title!r} on"
        raise SamplerError("scheduler", f"scheduler {scheduler!r} {what}; for {title!r} use "
                                        f"{' or '.join(label for n, label in SCHEDULERS if n in schedules)}")
    return title, schedules[schedule]


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers, in A1111's shape."""
    listed = [{"name": title, "aliases": aliases, "options": options}
              for title, (aliases, _, options) in SAMPLERS.items()]
    return listed + [{"name": name, "aliases": [], "options": {"scheduler": schedule}}
                     for name, (_, schedule) in COMBINED.items() if " " in name]


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers, in A1111's shape."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1 if name == "automatic" else 7.0,
             "need_inner_model": False} for name, label in SCHEDULERS]
