"""Property tests: every op against sdcore.reference over drawn shapes (1, primes, N != M, head dims that are
not powers of two), strides (permuted, padded rows with storage offsets, stride 0 from expand, overlapping
as_strided rows, a strided last dim), dtypes, causal flags, scales, magnitudes and special values (NaN, +-inf).

Tolerances are the project's rule (conftest.check_precision: float32 within 1e-5 of the float64 reference,
half types within 2x PyTorch's own error); with special values, NaN/+inf/-inf must sit exactly where the
reference has them (conftest.check_special). Deterministic in CI through the "ci" hypothesis profile
(conftest.py); a failure prints the @reproduce_failure blob that replays it.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from sdcore import StepCoefficients, _backend, ops, reference, schedulers, use_backend

from conftest import check_precision, check_special, devices, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 2, 3, 5, 7, 13, 17, 31, 64, 67, 97]  # 1, primes, and both sides of 64-row blocks
HEAD_DIMS = [1, 3, 8, 16, 24, 40, 59, 64, 72, 80, 100, 128, 160]
SPECIALS = [math.nan, math.inf, -math.inf]
LAYOUTS = ["contiguous", "permuted", "padded", "expanded", "overlapping", "strided_last"]


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return list(reversed(strides))


@st.composite
def layouts(draw, shape):
    """(strides, storage offset) of one way to lay `shape` out in memory."""
    n = len(shape)
    kind = draw(st.sampled_from(LAYOUTS))
    strides = _contiguous_strides(shape)
    if kind == "permuted":  # e.g. [B, N, H, D] projections viewed as [B, H, N, D]
        order = draw(st.permutations(range(n)))
        permuted = _contiguous_strides([shape[i] for i in order])
        for pos, dim in enumerate(order):
            strides[dim] = permuted[pos]
    elif kind == "padded":  # a slice of a larger tensor: every dim padded
        pads = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        strides = _contiguous_strides([size + pad for size, pad in zip(shape, pads)])
    elif kind == "expanded":  # stride 0: expand() of size-1 dims
        zero = draw(st.sets(st.sampled_from(range(n)), min_size=1))
        strides = _contiguous_strides([1 if i in zero else size for i, size in enumerate(shape)])
        strides = [0 if i in zero else s for i, s in enumerate(strides)]
    elif kind == "overlapping":  # as_strided rows that share elements
        dims = [i for i in range(n - 1) if shape[i] > 1 and strides[i] > 1]
        if dims:
            dim = draw(st.sampled_from(dims))
            strides[dim] = draw(st.integers(1, strides[dim] - 1))
    elif kind == "strided_last":
        strides = [2 * s for s in strides]
    note(f"layout {kind} {tuple(shape)} strides {tuple(strides)}")
    event(f"layout {kind}")  # --hypothesis-show-statistics shows how often each was drawn
    return strides, draw(st.integers(0, 5))


@st.composite
def tensors(draw, shape, dtype, device, *, magnitude=1.0, offset=0.0, specials=0):
    """A tensor of `shape` with values offset + magnitude * N(0, 1) (clamped to 5 sigma, so float16 never
    overflows), laid out by `layouts`, with up to `specials` elements set to NaN/+-inf through the view."""
    strides, storage_offset = draw(layouts(shape))
    size = storage_offset + sum((s - 1) * t for s, t in zip(shape, strides)) + 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    storage = torch.randn(size, generator=g).clamp_(-5, 5) * magnitude + offset
    numel = math.prod(shape)
    for _ in range(draw(st.integers(0, specials))):
        flat, value = draw(st.integers(0, numel - 1)), draw(st.sampled_from(SPECIALS))
        index = [(flat // math.prod(shape[i + 1:])) % shape[i] for i in range(len(shape))]
        storage[storage_offset + sum(i * t for i, t in zip(index, strides))] = value
    return storage.to(device, dtype).as_strided(shape, strides, storage_offset)


def _has_special(*ts):
    special = any(t is not None and not torch.isfinite(t).all() for t in ts)
    event("special values" if special else "finite values")
    return special


def _dbl(t):
    return None if t is None else t.double()


def _finite_max(t):
    """max |t| over its finite elements (0 if none)."""
    t = t.abs()
    return t[t.isfinite()].max().item() if t.isfinite().any() else 0.0


# --- attention -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@given(data=st.data())
def test_attention_matches_reference(device, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n, m, d = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES)), draw(st.sampled_from(HEAD_DIMS))
    causal = draw(st.booleans())
    specials = draw(st.sampled_from([0, 0, 3]))
    factor = draw(st.sampled_from([None, 0.0, 0.3, -1.0, 1.0, 2.5]))  # the scale, in units of 1/sqrt(D)
    qk_mag = draw(st.sampled_from([1.0, 1.0, 3.0]))
    v_mag = draw(st.sampled_from([1.0, 1.0, 1e3]))
    scale = None if factor is None else factor / math.sqrt(d)
    q = draw(tensors((b, h, n, d), dtype, device, magnitude=qk_mag, specials=specials))
    k = draw(tensors((b, h, m, d), dtype, device, magnitude=qk_mag, specials=specials))
    v = draw(tensors((b, h, m, d), dtype, device, magnitude=v_mag, specials=specials))
    note(f"{dtype} q {tuple(q.shape)} k {tuple(k.shape)} causal={causal} scale={scale}")
    special = _has_special(q, k, v)
    largest, bound = _score_sizes(q, k, scale)
    # With special values, scores stay moderate, so no softmax weight underflows (float16 P on CUDA: below
    # e^-16.6): a weight that is 0 in one precision and tiny in another turns 0 * inf (NaN) into tiny * inf
    # (inf), a rounding question rather than a special-value rule.
    assume(not special or largest <= 8)

    out = ops.attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    # the [B, N, H, D] memory the out-projection reads (sdcore.ops.attention's layout contract)
    assert out.transpose(1, 2).is_contiguous() if _backend.get_backend() == "kernels" else out.is_contiguous()
    ref = reference.attention(_dbl(q), _dbl(k), _dbl(v), causal=causal, scale=scale)
    # SDPA is only the error yardstick: dense copies (its efficient kernel faults on some views on CUDA).
    torch_out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=causal,
                                               scale=scale)
    if special:
        # Few finite outputs may be left, each a sum that can nearly cancel: errors are measured against the
        # size of the terms, sum_j p_ij |v_jd| (the reference with |v|), not of their sum.
        sizes = reference.attention(_dbl(q), _dbl(k), _dbl(v).abs(), causal=causal, scale=scale)
        check_special(out, torch_out, ref, dtype, _finite_max(sizes))
    elif dtype == torch.float32 and bound > 20:
        # Scores that can reach the tens: rounding the scores themselves costs ~|q||k| scale * 6e-8 in float32,
        # so the bar is PyTorch's own float32 error on the same input (as test_large_scores_stay_finite).
        assert rel_error(out, ref) <= max(2 * rel_error(torch_out, ref), 1e-5)
    else:
        check_precision(out, torch_out, ref, dtype)


def _score_sizes(q, k, scale):
    """The largest |score| and the largest scale * sum_d |q_d k_d| (what the score's rounding scales with),
    over finite scores."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k = q.double().cpu(), k.double().cpu()
    return (_finite_max((scale * q @ k.transpose(-1, -2)).abs()),
            _finite_max(abs(scale) * q.abs() @ k.abs().transpose(-1, -2)))


# --- group_norm ------------------------------------------------------------------------------------------------

@st.composite
def affine(draw, channels, x_dtype, device, specials):
    if draw(st.booleans()):
        return None
    dtype = draw(st.sampled_from([x_dtype, torch.float32]))
    return draw(tensors((channels,), dtype, device, magnitude=draw(st.sampled_from([1.0, 10.0])),
                        offset=draw(st.sampled_from([0.0, 1.0])), specials=specials))


@pytest.mark.parametrize("device", devices())
@given(data=st.data())
def test_group_norm_matches_reference(device, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    groups, per_group = draw(st.sampled_from([1, 2, 3, 4, 8])), draw(st.sampled_from([1, 2, 3, 5]))
    channels = groups * per_group
    spatial = draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 11]), min_size=0, max_size=3))
    shape = (draw(st.integers(1, 3)), channels, *spatial)
    specials = draw(st.sampled_from([0, 0, 2]))
    # Large means stay float32 only: float16 keeps 3 digits of 1e4 (its own error is what the rule measures).
    offset = draw(st.sampled_from([0.0, 0.5] + ([1e4] if dtype == torch.float32 else [])))
    magnitude = draw(st.sampled_from([1.0, 30.0]))
    channels_last = len(shape) in (4, 5) and draw(st.booleans())
    x = draw(tensors(shape, dtype, device, magnitude=magnitude, offset=offset, specials=specials))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    weight = draw(affine(channels, dtype, device, specials))
    bias = draw(affine(channels, dtype, device, specials))
    # eps > 0: with eps = 0 a constant group is 0/0 in the reference only up to how it rounds its mean.
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1]))
    silu = draw(st.booleans())
    note(f"{dtype} x {tuple(x.shape)} strides {x.stride()} groups={groups} eps={eps} silu={silu}")

    out = ops.group_norm(x, groups, weight, bias, eps, silu=silu)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=reference.memory_format_of(x))
    ref = reference.group_norm(x.double(), groups, _dbl(weight), _dbl(bias), eps, silu=silu)
    if x.numel() == shape[0] * groups:
        torch_out = ref.to(dtype)  # groups of one element, which F.group_norm refuses: rounding is its error
    else:
        same = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (F.group_norm wants one dtype)
        torch_out = F.group_norm(x, groups, same(weight), same(bias), eps)
        torch_out = F.silu(torch_out) if silu else torch_out
    # Errors against the size of the terms, |normalized x * weight| + |bias|: with few elements (a group of
    # two, or the finite ones left among NaN) weight and bias can nearly cancel in every one of them.
    sizes = reference.group_norm(x.double(), groups, _dbl(weight), None, eps).abs()
    if bias is not None:
        sizes = sizes + bias.double().abs().reshape((1, channels) + (1,) * len(spatial))
    check = check_special if _has_special(x, weight, bias) else check_precision
    check(out, torch_out, ref, dtype, _finite_max(sizes))


# --- scheduler_step --------------------------------------------------------------------------------------------

@st.composite
def coefficients(draw):
    """Real schedulers' coefficients, or arbitrary ones (zeros included, clip on or off)."""
    kind = draw(st.sampled_from(["ddim", "euler", "dpmpp_2m", "any"]))
    prediction = draw(st.sampled_from(["epsilon", "v_prediction"]))
    if kind == "ddim":
        a, a_prev = sorted(draw(st.lists(st.floats(0.01, 0.99), min_size=2, max_size=2)))
        return schedulers.ddim(a, a_prev, eta=draw(st.sampled_from([0.0, 0.7])), prediction_type=prediction)
    if kind == "euler":
        return schedulers.euler(draw(st.floats(0.5, 14.0)), draw(st.floats(0.0, 0.4)), prediction_type=prediction)
    if kind == "dpmpp_2m":
        return schedulers.dpmpp_2m(draw(st.floats(1.0, 14.0)), draw(st.floats(0.1, 0.9)), draw(st.floats(15, 20)),
                                   prediction_type=prediction)
    # No magnitudes below 0.01: a coefficient that rounds to 0 in float32 turns coef * inf into NaN, not inf.
    coef = st.one_of(st.just(0.0), st.floats(0.01, 2.0), st.floats(-2.0, -0.01))
    return StepCoefficients(*(draw(coef) for _ in range(2)), draw(st.sampled_from([0.0, 0.5, 1.0])),
                            *(draw(coef) for _ in range(7)),
                            history=tuple(draw(st.lists(coef, max_size=4))))


def _term_size(mo, x, c, history, noise, guidance):
    """max over elements of sum |coefficient * term| of the step's out and of its state: the scale of their rounding
    error, which cancellation in the result (a small tensor whose few elements all nearly cancel) doesn't
    shrink. The reference on absolute values and coefficients, with |u| + |g| (|c| + |u|) for the guidance."""
    m = mo.double().abs()
    if guidance is not None:
        uncond, cond = m.chunk(2)
        m = uncond + abs(guidance) * (cond + uncond)
    fields = {f.name: abs(getattr(c, f.name)) for f in dataclasses.fields(c) if f.name not in ("clip", "history")}
    ac = StepCoefficients(**fields, history=tuple(abs(h) for h in c.history))
    out, state = reference.scheduler_step(m, x.double().abs(), ac, history=[h.double().abs() for h in history],
                                          noise=None if noise is None else noise.double().abs())
    return _finite_max(out), _finite_max(state)


@pytest.mark.parametrize("device", devices())
@given(data=st.data())
def test_scheduler_step_matches_reference(device, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    c = draw(coefficients())
    shape = (draw(st.integers(1, 3)), *draw(st.lists(st.sampled_from([1, 2, 3, 4, 7, 13]), min_size=0, max_size=3)))
    guidance = draw(st.one_of(st.none(), st.floats(1.0, 12.0)))
    specials = draw(st.sampled_from([0, 0, 2]))
    return_state = draw(st.booleans())
    mo_shape = ((2 * shape[0],) if guidance is not None else shape[:1]) + shape[1:]
    mo = draw(tensors(mo_shape, dtype, device, specials=specials))
    x = draw(tensors(shape, dtype, device, magnitude=3.0, specials=specials))
    history = [draw(tensors(shape, dtype, device, specials=specials)) for _ in c.history]
    noise = draw(tensors(shape, dtype, device, specials=specials)) if c.next_from_noise != 0 else None
    note(f"{dtype} {c} sample {tuple(x.shape)} guidance={guidance}")

    out, state = ops.scheduler_step(mo, x, c, history=history, noise=noise, guidance_scale=guidance,
                                    return_state=return_state)
    assert out.shape == x.shape and out.dtype == dtype and (state is None) == (not return_state)
    ref_out, ref_state = reference.scheduler_step(mo.double(), x.double(), c, history=[h.double() for h in history],
                                                  noise=_dbl(noise), guidance_scale=guidance)
    with use_backend("torch"):
        t_out, t_state = ops.scheduler_step(mo, x, c, history=history, noise=noise, guidance_scale=guidance)
    check = check_special if _has_special(mo, x, noise, *history) else check_precision
    out_size, state_size = _term_size(mo, x, c, history, noise, guidance)
    check(out, t_out, ref_out, dtype, out_size)
    if return_state:
        check(state, t_state, ref_state, dtype, state_size)
