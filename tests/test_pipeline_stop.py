"""StopDenoising: a step callback ends the loop after the step it was called for, and the latents finished so
far are decoded and returned (what `sdcore serve`'s interrupt relies on), for text and image to image."""
import torch

import sdcore
from sdcore import embedded
from sdcore.pipelines import StableDiffusionImg2ImgPipeline

FAST = dict(num_inference_steps=4, height=32, width=32, seed=3, progress=False)


def _stop_after(step):
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, tensors["latents"].clone()))
        if i == step:
            raise sdcore.StopDenoising
        return {}
    return callback, seen


def test_stop_returns_the_latents_of_the_step_it_was_raised_in():
    pipe = embedded.build("tiny")
    pipe.set_scheduler("ddim")
    callback, seen = _stop_after(1)
    out = pipe("a cat", output_type="latent", callback_on_step_end=callback, **FAST)
    assert [i for i, _ in seen] == [0, 1]  # steps 3 and 4 never ran
    assert torch.equal(out.images, seen[-1][1])
    full = pipe("a cat", output_type="latent", **FAST)
    assert not torch.equal(full.images, out.images)


def test_a_stopped_generation_is_decoded_like_any_other():
    pipe = embedded.build("tiny")
    pipe.set_scheduler("euler")
    callback, seen = _stop_after(0)
    images = pipe("a cat", callback_on_step_end=callback, **FAST).images
    assert len(seen) == 1 and images[0].size == (32, 32)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    callback, seen = _stop_after(1)
    kwargs = {k: v for k, v in FAST.items() if k not in ("height", "width")}
    out = img2img("a cat", images[0], strength=1.0, callback_on_step_end=callback, **kwargs)
    assert len(seen) == 2 and out.images[0].size == (32, 32)
