"""The scheduler classes against diffusers': same config in, same trajectory out (CFG folded into the step)."""
import inspect
import json

import pytest
import torch

from sdcore import schedulers

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)


def _unet(x, t):
    """A deterministic, well-conditioned stand-in for the UNet (uncond, cond): it depends on the input and the
    timestep, and rounding differences shrink along the trajectory instead of growing, so the comparison
    measures the schedulers, not chaos."""
    t = float(t)
    return torch.cat([0.8 * torch.tanh(0.5 * x[:1]) + 0.0002 * t, 0.9 * torch.tanh(0.5 * x[1:]) - 0.0001 * t])


def _run(scheduler, steps, guidance, seed, fused, step_kwargs):
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    if "generator" in inspect.signature(scheduler.step).parameters:  # PNDM's step takes none
        step_kwargs = dict(step_kwargs, generator=g)
    for t in scheduler.timesteps:
        out = _unet(scheduler.scale_model_input(torch.cat([x, x]), t), t)
        if fused:
            x = scheduler.step(out, t, x, guidance_scale=guidance, **step_kwargs).prev_sample
        else:
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x, **step_kwargs).prev_sample
    return x


CASES = [
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    ("DDIMScheduler", dict(timestep_spacing="linspace", set_alpha_to_one=True), {}),
    ("DDIMScheduler", dict(clip_sample=True), dict(eta=0.5)),
    ("DDIMScheduler", dict(clip_sample=True, prediction_type="sample"), dict(use_clipped_model_output=True)),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    ("EulerDiscreteScheduler", dict(timestep_spacing="linspace"), {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace"), {}),
    ("PNDMScheduler", {}, {}),
    ("PNDMScheduler", dict(prediction_type="v_prediction"), {}),
    ("PNDMScheduler", dict(timestep_spacing="linspace"), {}),
    ("PNDMScheduler", dict(timestep_spacing="trailing", set_alpha_to_one=True), {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("LMSDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading"), {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", dict(prediction_type="v_prediction"), {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), {}),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading"), {}),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_order=1), {}),
]


@pytest.mark.parametrize("name,overrides,step_kwargs", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in {**c[1], **c[2]}.items()) or 'sd15'}"
                              for c in CASES])
@pytest.mark.parametrize("steps", [7, 20])
def test_trajectory_matches_diffusers(name, overrides, step_kwargs, steps):
    config = {**SD15, **overrides}
    ref = getattr(diffusers, name).from_config(config)
    ours = getattr(schedulers, name).from_config(config)
    expected = _run(ref, steps, 7.5, 11, fused=False, step_kwargs=step_kwargs)
    got = _run(ours, steps, 7.5, 11, fused=True, step_kwargs=step_kwargs)
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double())
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"relative error {err:.2e} against diffusers"


def test_from_pretrained_reads_a_diffusers_model_folder(tmp_path):
    diffusers.DDIMScheduler.from_config({**SD15, "prediction_type": "v_prediction"}).save_config(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    s = schedulers.DDIMScheduler.from_pretrained(tmp_path)
    assert s.config["prediction_type"] == "v_prediction" and s.config["steps_offset"] == 1
    assert schedulers.EulerDiscreteScheduler.from_pretrained(tmp_path / "scheduler").config["beta_end"] == 0.012


def test_step_before_set_timesteps_is_a_clear_error():
    s = schedulers.DDIMScheduler()
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        s.step(torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2))


def test_unknown_timestep_is_a_clear_error():
    s = schedulers.EulerDiscreteScheduler.from_config(SD15)
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.scale_model_input(torch.zeros(1), 3)


@pytest.mark.parametrize("bad", [dict(beta_schedule="cosine"), dict(prediction_type="x0"),
                                 dict(timestep_spacing="random")])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        s = schedulers.DDIMScheduler(**bad)
        s.set_timesteps(4)


def test_unsupported_options_say_so():
    with pytest.raises(NotImplementedError, match="thresholding"):
        schedulers.DDIMScheduler(thresholding=True)
    with pytest.raises(NotImplementedError, match="linear sigma interpolation"):
        schedulers.EulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(NotImplementedError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        schedulers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")


@pytest.mark.parametrize("name", list(schedulers.NAMES))
def test_cli_names(name):
    s = schedulers.from_name(name, SD15)
    s.set_timesteps(10)
    assert s.config["beta_end"] == 0.012 and len(s.timesteps) >= 10
    if name == "dpm++2m-karras":
        assert s.config["use_karras_sigmas"]
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        schedulers.from_name("heun")


def _run_from(scheduler, steps, strength, x0, noise, fused):
    """img2img's schedule as diffusers runs it: skip the first (1 - strength) of the steps, noise the clean
    latents to the first remaining timestep, denoise from there."""
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):  # diffusers' DDIM and PNDM have none: they look up timesteps
        scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.add_noise(x0, noise, timesteps[:1])
    start = x.clone()
    kwargs = {"generator": torch.Generator().manual_seed(5)} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        out = _unet(scheduler.scale_model_input(torch.cat([x, x]), t), t)
        if fused:
            x = scheduler.step(out, t, x, guidance_scale=7.5, **kwargs).prev_sample
        else:
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + 7.5 * (cond - uncond), t, x, **kwargs).prev_sample
    return start, x


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "LMSDiscreteScheduler"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_start_matches_diffusers(name, strength):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ref_start, ref_end = _run_from(getattr(diffusers, name).from_config(SD15), 10, strength, x0, noise, False)
    start, end = _run_from(getattr(schedulers, name).from_config(SD15), 10, strength, x0, noise, True)
    torch.testing.assert_close(start, ref_start, rtol=1e-5, atol=1e-5)
    err = ((end - ref_end).abs().max() / ref_end.abs().max()).item()
    assert err < 1e-4, f"relative error {err:.2e} against diffusers"
