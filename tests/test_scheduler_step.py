import math

import pytest
import torch

from sdcore import StepCoefficients, ops, reference, schedulers

from conftest import check_precision, devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tensors(shape, n_hist, noise, cfg, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mo_shape = (2 * shape[0],) + tuple(shape[1:]) if cfg else shape
    mk = lambda s: (torch.randn(s, generator=g)).to(device, dtype)  # noqa: E731
    return mk(mo_shape), mk(shape) * 3, [mk(shape) for _ in range(n_hist)], (mk(shape) if noise else None)


COEFFS = {
    "all-terms": StepCoefficients(0.9, -1.3, 0.0, 0.7, 0.2, 0.5, 0.3, 0.1, -0.4, 1.1, (0.25, -0.5, 0.125, 0.75)),
    "clip": StepCoefficients(1.5, -2.0, 1.0, 0.1, 0.2, 0.9, 0.0, 0.0, 0.0, 1.0, (0.3,)),
    "ddim": schedulers.ddim(0.3, 0.45),
    "ddim-eta": schedulers.ddim(0.3, 0.45, eta=0.7),
    "euler-v": schedulers.euler(4.0, 3.1, prediction_type="v_prediction"),
    "dpmpp2m": schedulers.dpmpp_2m(4.0, 3.1, 5.0),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(COEFFS))
@pytest.mark.parametrize("cfg", [7.5, None], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 96, 96), (3, 4, 7, 9)])
def test_matches_reference(poisoned, device, dtype, name, cfg, shape):
    c = COEFFS[name]
    mo, x, hist, noise = _tensors(shape, len(c.history), c.next_from_noise != 0, cfg is not None, device, dtype)
    out, state = ops.scheduler_step(mo, x, c, history=hist, noise=noise, guidance_scale=cfg)
    assert out.shape == x.shape and state.shape == x.shape and out.dtype == dtype
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    ref_out, ref_state = reference.scheduler_step(dbl(mo), dbl(x), c, history=[dbl(h) for h in hist],
                                                  noise=dbl(noise), guidance_scale=cfg)
    from sdcore import use_backend
    with use_backend("torch"):
        t_out, t_state = ops.scheduler_step(mo, x, c, history=hist, noise=noise, guidance_scale=cfg)
    check_precision(out, t_out, ref_out, dtype)
    check_precision(state, t_state, ref_state, dtype)


@pytest.mark.parametrize("device", devices())
def test_without_state(poisoned, device):
    c = COEFFS["ddim"]
    mo, x, _, _ = _tensors((1, 4, 8, 8), 0, False, True, device, torch.float32)
    out, state = ops.scheduler_step(mo, x, c, guidance_scale=5.0, return_state=False)
    assert state is None
    ref, _ = reference.scheduler_step(mo.double(), x.double(), c, guidance_scale=5.0)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(poisoned, device):
    c = COEFFS["all-terms"]
    g = torch.Generator().manual_seed(3)
    big = torch.randn(8, 2, 4, 16, 16, generator=g).to(device)
    mo, x = big[:2, 0], big[2:3, 1].transpose(-1, -2)
    hist = [big[3 + i, :1] for i in range(4)]
    noise = big[7, 1:].transpose(-1, -2)
    out, state = ops.scheduler_step(mo, x, c, history=hist, noise=noise, guidance_scale=3.0)
    ref_out, ref_state = reference.scheduler_step(mo.double(), x.double(), c, history=[h.double() for h in hist],
                                                  noise=noise.double(), guidance_scale=3.0)
    assert (out.double() - ref_out).abs().max() < 1e-5 * ref_out.abs().max()
    assert (state.double() - ref_state).abs().max() < 1e-5 * ref_state.abs().max()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expanded_inputs_and_special_values(poisoned, device, dtype):
    # Stride-0 inputs are copied dense by prepare_step; NaN/inf go through the same formula as the reference,
    # clamp included (NaN stays NaN through the clip).
    c = COEFFS["clip"]
    g = torch.Generator().manual_seed(4)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    mo = mk(2, 4, 1, 6).expand(2, 4, 5, 6).clone()
    mo[0, 1, 2, 3], mo[1, 2, 0, 0], mo[0, 3, 4, 5] = float("nan"), float("inf"), float("-inf")
    x = mk(1, 1, 5, 6).expand(1, 4, 5, 6)
    hist = [mk(1).expand(1, 4, 5, 6)]
    out, state = ops.scheduler_step(mo, x, c, history=hist, guidance_scale=2.0)
    dbl = lambda t: t.double()  # noqa: E731
    ref_out, ref_state = reference.scheduler_step(dbl(mo), dbl(x), c, history=[dbl(h) for h in hist],
                                                  guidance_scale=2.0)
    for got, want in ((out, ref_out), (state, ref_state)):
        want = want.to(dtype)
        for fn in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(fn(got).cpu(), fn(want).cpu())
        assert got.isnan().any()
        finite = want.isfinite()
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert ((got[finite].double() - want[finite].double()).abs().max() <= tol * want[finite].abs().max()).item()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_model_output_without_guidance_stays_infinite(device, dtype):
    # Without guidance the CPU kernel still applied guide(u, u, 1) = u + (u - u), which is NaN for u = +-inf;
    # the reference uses the model output as is. (Found by test_ops_properties.)
    c = StepCoefficients(x0_from_output=1.0, next_from_output=1.0, next_from_x0=1.0, state_from_output=2.0,
                         state_from_x0=1.0)
    mo = torch.tensor([math.inf, 1.0, -math.inf] * 3000).to(device, dtype)
    x = torch.randn(9000).to(device, dtype)
    out, state = ops.scheduler_step(mo, x, c)
    ref_out, ref_state = reference.scheduler_step(mo.double(), x.double(), c)
    for got, want in ((out, ref_out), (state, ref_state)):
        assert torch.equal(got.isposinf().cpu(), want.isposinf().cpu()) and not got.isnan().any()
        assert torch.equal(got.isneginf().cpu(), want.isneginf().cpu())


@pytest.mark.parametrize("backend", ["kernels", "torch", "reference"])
@pytest.mark.parametrize("change,message", [
    (dict(model_output=[0.0]), "sdcore.scheduler_step: model_output must be a torch.Tensor, got list"),
    (dict(sample=None), "sdcore.scheduler_step: sample must be a torch.Tensor, got NoneType"),
    (dict(noise=0.5), "sdcore.scheduler_step: noise must be a torch.Tensor or None, got float"),
    (dict(history=[[1.0]]), "sdcore.scheduler_step: history[0] must be a torch.Tensor, got list"),
    (dict(history=torch.zeros(1, 4, 2, 2)),
     "sdcore.scheduler_step: history must be a sequence of torch.Tensor, got Tensor"),
    (dict(coeffs={"next_from_sample": 1.0}),
     "sdcore.scheduler_step: coeffs must be a sdcore.StepCoefficients, got dict"),
    (dict(guidance_scale="7.5"), "sdcore.scheduler_step: guidance_scale must be a real number or None, got str"),
], ids=["model_output", "sample", "noise", "history-item", "history-tensor", "coeffs", "guidance"])
def test_non_tensor_argument_is_a_type_error(backend, change, message):
    from sdcore import use_backend
    s = torch.randn(1, 4, 2, 2)
    args = dict(model_output=s, sample=s, coeffs=StepCoefficients(history=(0.5,)), history=[s]) | change
    with use_backend(backend), pytest.raises(TypeError) as info:
        ops.scheduler_step(**args)
    assert str(info.value) == message


# --- The op expresses real samplers: whole trajectories against diffusers' schedulers -------------------

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")


def _diffusers_trajectory(scheduler, model, sample, steps, guidance, seed):
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = sample.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = model(inp, t)
        uncond, cond = out.chunk(2)
        guided = uncond + guidance * (cond - uncond)
        x = scheduler.step(guided, t, x, generator=g, return_dict=False)[0]
    return x


def _fake_unet(x, t):
    """A deterministic, well-conditioned stand-in for the UNet (uncond, cond): it depends on the input and the
    timestep, and rounding differences shrink along the trajectory instead of growing, so the comparison
    measures the schedulers, not chaos."""
    t = float(t)
    return torch.cat([0.8 * torch.tanh(0.5 * x[:1]) + 0.0002 * t, 0.9 * torch.tanh(0.5 * x[1:]) - 0.0001 * t])


def _config():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1)


def _sdcore_trajectory(kind, scheduler, sample, steps, guidance, seed, prediction_type):
    """Drive the fused op with coefficients from sdcore.schedulers, using diffusers' timestep/sigma tables."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = sample.clone() * scheduler.init_noise_sigma
    prev_x0 = None
    timesteps = list(scheduler.timesteps)
    ac = scheduler.alphas_cumprod.double()
    for i, t in enumerate(timesteps):
        if kind == "ddim":
            prev_t = int(t) - scheduler.config.num_train_timesteps // steps
            a_prev = ac[prev_t].item() if prev_t >= 0 else scheduler.final_alpha_cumprod.item()
            c = schedulers.ddim(ac[int(t)].item(), a_prev, eta=0.0, prediction_type=prediction_type)
            inp = torch.cat([x, x])
        else:
            sig = scheduler.sigmas.double()
            sigma, sigma_next = sig[i].item(), sig[i + 1].item()
            if kind == "dpmpp2m":
                c = schedulers.dpmpp_2m(sigma, sigma_next, sig[i - 1].item() if i > 0 else None,
                                        prediction_type=prediction_type, second_order=i > 0 and sigma_next > 0)
                inp = torch.cat([x, x])
            else:
                fn = schedulers.euler if kind == "euler" else schedulers.euler_ancestral
                c = fn(sigma, sigma_next, prediction_type=prediction_type)
                inp = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
        noise = None
        if c.next_from_noise:
            noise = torch.randn(x.shape, generator=g)
        history = [prev_x0] if c.history else []
        x, prev_x0 = ops.scheduler_step(_fake_unet(inp, t), x, c, history=history, noise=noise,
                                        guidance_scale=guidance)
    return x


@pytest.mark.parametrize("kind,prediction_type", [
    ("ddim", "epsilon"), ("ddim", "v_prediction"), ("euler", "epsilon"), ("euler", "v_prediction"),
    ("euler_a", "epsilon"), ("dpmpp2m", "epsilon"), ("dpmpp2m", "v_prediction")])
def test_trajectory_matches_diffusers(kind, prediction_type):
    cfg = dict(_config(), prediction_type=prediction_type)
    make = {
        "ddim": lambda: diffusers.DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False),
        "euler": lambda: diffusers.EulerDiscreteScheduler(**cfg),
        "euler_a": lambda: diffusers.EulerAncestralDiscreteScheduler(**cfg),
        "dpmpp2m": lambda: diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++",
                                                                   solver_order=2, lower_order_final=True),
    }[kind]
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = _diffusers_trajectory(make(), _fake_unet, sample, 12, 7.5, seed=5)
    got = _sdcore_trajectory(kind, make(), sample, 12, 7.5, seed=5, prediction_type=prediction_type)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"{kind}/{prediction_type}: relative error {err:.2e} against diffusers"
