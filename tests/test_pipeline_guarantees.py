"""What the pipeline promises beyond parity: every number range-checked before any work, NaN/Inf stops a
generation naming the component and step, and one pipeline serving several threads gives each call exactly
its sequential result."""
import math
import threading

import numpy as np
import pytest
import torch

import sdcore
from sdcore import embedded
from sdcore.pipelines import NonFiniteError, StableDiffusionImg2ImgPipeline

from conftest import run_in_threads

FAST = dict(num_inference_steps=2, height=64, width=64, progress=False, output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return embedded.build("tiny")


class _Calls:
    """Counts forward calls of the text encoder, UNet and VAE: 'before any work' means all stay at 0."""

    def __init__(self, pipe):
        self.count = 0
        self.modules = (pipe.text_encoder, pipe.unet, pipe.vae)
        self.hooks = [m.register_forward_pre_hook(self._hit) for m in self.modules]

    def _hit(self, *_):
        self.count += 1

    def close(self):
        for h in self.hooks:
            h.remove()


BAD_CALLS = [
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer in 1..1000, got 0"),
    (dict(num_inference_steps=-3), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an integer"),
    (dict(num_inference_steps=True), TypeError, "num_inference_steps must be an integer"),
    (dict(num_inference_steps=1001), ValueError, "num_inference_steps"),
    # PLMS with 'leading' spacing and steps_offset 1 would reach timestep 1000 of 0..999.
    (dict(num_inference_steps=1000), ValueError, "num_inference_steps=1000 is more than PNDMScheduler can take"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale must be a finite number in [0, 100], got nan"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale must be a number"),
    (dict(guidance_rescale=1.5), ValueError, "guidance_rescale must be a finite number in [0, 1]"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an integer in 1..64"),
    (dict(num_images_per_prompt=65), ValueError, "num_images_per_prompt"),
    (dict(eta=math.nan), ValueError, "eta"),
    (dict(seed=-1), ValueError, "seed must be an integer in 0..9223372036854775807, got -1"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=2**63 - 1, num_images_per_prompt=2), ValueError, "seed must be at most 2**63 - 2"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(clip_skip=2), ValueError, "clip_skip must be an integer in 0..1"),  # tiny's encoder has 2 layers
    (dict(clip_skip=-1), ValueError, "clip_skip"),
    (dict(height=0), ValueError, "height must be an integer in 8..8192, got 0"),
    (dict(width=-64), ValueError, "width"),
    (dict(height=60), ValueError, "height must be a multiple of 8"),
    (dict(width=8200), ValueError, "width must be an integer in 8..8192"),
    (dict(height=64.0), TypeError, "height must be an integer"),
    (dict(output_type="jpeg"), ValueError, "output_type must be one of pil, np, pt, latent"),
    (dict(prompt=None), TypeError, "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=[]), TypeError, "prompt must be a string"),
    (dict(prompt=["a", 3]), TypeError, "prompt must be a string"),
    (dict(negative_prompt=5), TypeError, "negative_prompt must be a string"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "1 negative prompts for 2 prompts"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), ValueError, "latents must have shape (1, 4, 8, 8)"),
    (dict(generator=[torch.Generator()] * 2), ValueError, "generator: 2 generators for 1 images"),
]


@pytest.mark.parametrize("kwargs,error,fragment", BAD_CALLS, ids=[repr(c[0])[:60] for c in BAD_CALLS])
def test_bad_arguments_fail_before_any_work(pipe, kwargs, error, fragment):
    _refused_before_any_work(pipe, pipe, {**FAST, "prompt": "a cat", **kwargs}, error, fragment)


def _refused_before_any_work(pipe, run, call, error, fragment):
    """``run(**call)`` raises ``error`` with ``fragment`` and no model of ``pipe`` ran a forward."""
    calls = _Calls(pipe)
    try:
        with pytest.raises(error) as info:
            run(**call)
    finally:
        calls.close()
    assert fragment in str(info.value)
    assert calls.count == 0, "the pipeline ran a model before refusing its arguments"


BAD_IMG2IMG = [
    (dict(strength=1.5), ValueError, "strength must be a finite number in [0, 1], got 1.5"),
    (dict(strength=math.nan), ValueError, "strength"),
    (dict(strength=0.1, num_inference_steps=2), ValueError, "leaves no step to run"),
    (dict(image="photo.png"), TypeError, "image must be a PIL image or a torch tensor"),
    (dict(image=torch.full((1, 3, 64, 64), math.nan)), ValueError, "image: the tensor holds NaN"),
    (dict(image=torch.zeros(1, 4, 64, 64)), ValueError, "image: a tensor image must be float [B, 3, H, W]"),
]


@pytest.mark.parametrize("kwargs,error,fragment", BAD_IMG2IMG, ids=[repr(c[0])[:60] for c in BAD_IMG2IMG])
def test_bad_img2img_arguments_fail_before_any_work(pipe, kwargs, error, fragment):
    call = dict(FAST, prompt="a cat", image=torch.rand(1, 3, 64, 64), strength=0.5)
    del call["height"], call["width"]
    call.update(kwargs)
    _refused_before_any_work(pipe, StableDiffusionImg2ImgPipeline.from_pipe(pipe), call, error, fragment)


def _poisoned(module):
    """A context in which the first parameter of ``module`` is all NaN."""
    class Ctx:
        def __enter__(self):
            self.param = next(module.parameters())
            self.saved = self.param.detach().clone()
            with torch.no_grad():
                self.param.fill_(math.nan)

        def __exit__(self, *exc):
            with torch.no_grad():
                self.param.copy_(self.saved)
    return Ctx()


@pytest.mark.parametrize("part,component,step", [("unet", "UNet", 1), ("text_encoder", "text encoder", None),
                                                 ("vae.decoder", "VAE decode", None)])
def test_nan_stops_the_generation_naming_component_and_step(pipe, part, component, step):
    module = pipe
    for name in part.split("."):
        module = getattr(module, name)
    with _poisoned(module):
        with pytest.raises(NonFiniteError) as info:
            pipe("a cat", seed=0, **FAST)
        assert info.value.component == component and info.value.step == step
        assert component in str(info.value) and "allow_nan" in str(info.value)
        if step is not None:
            assert f"at step {step} of 2" in str(info.value)
        # allow_nan keeps the old behaviour: an image comes back (garbage) for debugging.
        image = pipe("a cat", seed=0, allow_nan=True, **FAST).images
        assert image.shape == (1, 64, 64, 3)


def test_nan_from_a_callback_names_the_callback_and_its_step(pipe):
    def callback(p, i, t, tensors):
        return {"latents": tensors["latents"] * math.nan} if i == 1 else {}
    with pytest.raises(NonFiniteError, match="the callback produced NaN/Inf at step 2 of 3"):
        pipe("a cat", seed=0, callback_on_step_end=callback, **dict(FAST, num_inference_steps=3))


def test_img2img_nan_in_the_input_latents_is_named(pipe):
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    with _poisoned(pipe.vae.encoder):
        with pytest.raises(NonFiniteError, match="VAE encode"):
            img2img("a cat", image=torch.rand(1, 3, 64, 64), strength=0.5, seed=0, num_inference_steps=2,
                    progress=False)


def test_one_pipeline_from_many_threads_gives_each_call_its_sequential_result(pipe):
    """4 threads x 3 calls on one pipeline with a multistep sampler (per-call history) and an ancestral one
    (per-call noise stream), txt2img and img2img mixed: every result equals the same call run alone."""
    pipe.set_scheduler("dpm++2m")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))

    def job(k):
        if k % 3 == 2:
            return img2img(f"a painting {k}", image=init, strength=0.75, seed=k, num_inference_steps=4,
                           progress=False, output_type="np").images
        return pipe(f"prompt number {k}", seed=100 + k, num_inference_steps=2 + k % 4, height=64, width=64,
                    guidance_scale=1.0 + k, progress=False, output_type="np").images

    jobs = list(range(12))
    sequential = {k: job(k) for k in jobs}
    results = {}

    def worker(i):
        with sdcore.use_backend("kernels"):
            for k in jobs[i::4]:
                results[k] = job(k)

    errors = run_in_threads(worker, 4)
    assert not errors, errors
    for k in jobs:
        np.testing.assert_array_equal(results[k], sequential[k], err_msg=f"call {k} differs under threads")


def test_pipelines_sharing_a_tokenizer_tokenize_from_many_threads(pipe):
    """from_pipe shares the tokenizer, whose padding settings live on the object while it encodes: with a lock
    per pipeline, a txt2img and an img2img call tokenizing at once padded to the longest prompt (a handful of
    ids in ~2400 here) instead of 77, and the text encoder's batch then failed to concatenate."""
    pipes = (pipe, StableDiffusionImg2ImgPipeline.from_pipe(pipe))
    length = pipe.tokenizer.model_max_length
    shapes = []

    def worker(i):
        for k in range(300):
            shapes.append(tuple(pipes[i % 2]._tokens([f"prompt {i} {k}", "a longer prompt " * (k % 5)]).shape))

    errors = run_in_threads(worker, 8)
    assert not errors, errors
    assert len(shapes) == 8 * 300
    assert set(shapes) == {(2, length)}, sorted(set(shapes))


def test_backend_scopes_are_per_thread():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other():
        with sdcore.use_backend("reference"):
            seen["other"] = sdcore.get_backend()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    seen["main"] = sdcore.get_backend()
    release.set()
    t.join()
    assert seen == {"other": "reference", "main": "kernels"}
