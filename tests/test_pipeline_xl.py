"""SDXL base and refiner against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the
same tiny random weights saved by diffusers (CPU, fp32): explicit and zeroed negatives, micro-conditioning,
clip_skip, img2img, the refiner's aesthetic score, the base->refiner hand-off; and the errors bad input gets."""
import numpy as np
import pytest
import torch

import sdcore
from sdcore import loading
from sdcore.pipelines import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
PROMPT, NEGATIVE = "a photo of a cat", "blurry"
XL_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
               transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=8)


def _perturb(model, scale=0.05):
    with torch.no_grad():  # random init leaves norms at identity and some projections at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _text(hidden, with_projection):
    config = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                                         num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
                                         projection_dim=16, hidden_act="gelu" if with_projection else "quick_gelu")
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return _perturb(cls(config), scale=0.02)


def _models():
    """Base: CLIP-L-like (24 wide) + bigG-like (16 wide, pooled 16) -> cross_attention_dim 40, 6 time ids.
    Refiner: the second encoder only, 5 time ids. One VAE, force_upcast and SDXL's scaling factor."""
    torch.manual_seed(0)
    vae = _perturb(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.13025, force_upcast=True))
    enc, enc2 = _text(24, False), _text(16, True)
    unet = _perturb(diffusers.UNet2DConditionModel(**XL_UNET, cross_attention_dim=40,
                                                   projection_class_embeddings_input_dim=16 + 6 * 8))
    refiner_unet = _perturb(diffusers.UNet2DConditionModel(**XL_UNET, cross_attention_dim=16,
                                                           projection_class_embeddings_input_dim=16 + 5 * 8))
    return vae, enc, enc2, unet, refiner_unet


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """diffusers' base and refiner pipelines, saved once for the module, and sdcore's loaded from the folders."""
    vae, enc, enc2, unet, refiner_unet = _models()
    euler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULE)
    base = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=loading.default_tokenizer(),
        tokenizer_2=loading.default_tokenizer(pad_token="!"), unet=unet, scheduler=euler)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=enc2, tokenizer=None,
        tokenizer_2=loading.default_tokenizer(pad_token="!"), unet=refiner_unet, scheduler=euler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    paths = {}
    for name, pipe in (("base", base), ("refiner", refiner)):
        pipe.set_progress_bar_config(disable=True)
        paths[name] = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(paths[name], safe_serialization=True)
    ours = {"base": StableDiffusionXLPipeline.from_pretrained(paths["base"]),
            "refiner": StableDiffusionXLImg2ImgPipeline.from_pretrained(paths["refiner"])}
    return {"base": base, "refiner": refiner}, ours, paths


def _latents(seed=1, batch=1):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def test_loads_the_saved_folders(saved):
    _, ours, _ = saved
    base, refiner = ours["base"], ours["refiner"]
    assert base.force_zeros_for_empty_prompt and not base.requires_aesthetics_score
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    assert not refiner.force_zeros_for_empty_prompt
    assert base.tokenizer_2.pad_token == "!" and base.tokenizer.pad_token == "<|endoftext|>"
    assert base.vae.config.scaling_factor == 0.13025 and base.vae.config.force_upcast
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


CASES = {
    "explicit negatives": dict(negative_prompt=NEGATIVE, negative_prompt_2="ugly", prompt_2="an oil painting"),
    "zeroed empty negative": dict(),
    "micro-conditioning": dict(original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(96, 64),
                               negative_original_size=(256, 256), negative_target_size=(32, 48),
                               negative_crops_coords_top_left=(8, 0), negative_prompt=NEGATIVE),
    "clip_skip": dict(clip_skip=1, negative_prompt=NEGATIVE),
    "two images, rescale": dict(num_images_per_prompt=2, guidance_rescale=0.5, negative_prompt=[NEGATIVE]),
}


# every case on the kernels; the reference backend on two (it shares all but sdcore.ops with the kernels path)
@pytest.mark.parametrize("case, backend", [(c, "kernels") for c in CASES] +
                         [("explicit negatives", "reference"), ("micro-conditioning", "reference")])
def test_txt2img_matches_diffusers(saved, case, backend):
    refs, ours, _ = saved
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, **CASES[case])
    n = kwargs.get("num_images_per_prompt", 1)
    want = refs["base"]([PROMPT], latents=_latents(batch=n), output_type="latent", **kwargs).images
    with sdcore.use_backend(backend):
        got = ours["base"]([PROMPT], latents=_latents(batch=n), output_type="latent", progress=False,
                           **kwargs).images
    assert got.shape == want.shape == (n, 4, 8, 8)
    assert _max_diff(got, want) <= 1e-4


def test_txt2img_image_matches_diffusers(saved):
    refs, ours, _ = saved
    want = refs["base"](PROMPT, latents=_latents(), num_inference_steps=2, output_type="np").images
    got = ours["base"](PROMPT, latents=_latents(), num_inference_steps=2, output_type="np", progress=False).images
    assert got.shape == want.shape == (1, 16, 16, 3)
    assert _max_diff(got, want) <= 2e-3


def test_options_change_the_result(saved):
    """The parity cases compare something that moves: each option changes the latents."""
    _, ours, _ = saved
    run = lambda **kw: ours["base"](PROMPT, latents=_latents(), num_inference_steps=2, output_type="latent",  # noqa
                                    progress=False, **kw).images
    plain = run()
    for kw in (dict(clip_skip=1), dict(original_size=(64, 64)), dict(negative_prompt=""), dict(prompt_2="a dog")):
        assert _max_diff(run(**kw), plain) > 1e-4, kw


def _image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_img2img_matches_diffusers(saved, backend):
    refs, ours, _ = saved
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(**refs["base"].components)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(strength=0.6, num_inference_steps=4, negative_prompt=NEGATIVE, output_type="np")
    want = ref(PROMPT, image=_image(), generator=_gen(), **kwargs).images
    with sdcore.use_backend(backend):
        got = StableDiffusionXLImg2ImgPipeline.from_pipe(ours["base"])(
            PROMPT, image=_image(), generator=_gen(), progress=False, **kwargs).images
    assert got.shape == want.shape == (1, 16, 16, 3)
    assert _max_diff(got, want) <= 2e-3


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_refiner_with_aesthetic_score_matches_diffusers(saved, backend):
    refs, ours, _ = saved
    kwargs = dict(strength=0.5, num_inference_steps=4, aesthetic_score=7.5, negative_aesthetic_score=1.0,
                  original_size=(64, 48), output_type="latent")
    want = refs["refiner"](PROMPT, image=_image(), generator=_gen(), **kwargs).images
    with sdcore.use_backend(backend):
        got = ours["refiner"](PROMPT, image=_image(), generator=_gen(), progress=False, **kwargs).images
    assert _max_diff(got, want) <= 1e-4
    other = ours["refiner"](PROMPT, image=_image(), generator=_gen(), progress=False,
                            **{**kwargs, "aesthetic_score": 3.0}).images
    assert _max_diff(other, got) > 1e-4


def test_base_to_refiner_hand_off_matches_diffusers(saved):
    refs, ours, _ = saved
    steps, split = 6, 0.7
    want_mid = refs["base"](PROMPT, latents=_latents(), num_inference_steps=steps, denoising_end=split,
                            output_type="latent").images
    got_mid = ours["base"](PROMPT, latents=_latents(), num_inference_steps=steps, denoising_end=split,
                           output_type="latent", progress=False).images
    assert _max_diff(got_mid, want_mid) <= 1e-4
    want = refs["refiner"](PROMPT, image=want_mid, num_inference_steps=steps, denoising_start=split,
                           generator=_gen(), output_type="np").images
    got = ours["refiner"](PROMPT, image=got_mid, num_inference_steps=steps, denoising_start=split, generator=_gen(),
                          output_type="np", progress=False).images
    assert got.shape == want.shape == (1, 16, 16, 3)
    assert _max_diff(got, want) <= 2e-3


def test_defaults_are_sdxl(saved):
    import inspect

    _, ours, _ = saved
    params = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    assert params["guidance_scale"].default == 5.0
    assert ours["base"].unet.config.sample_size * ours["base"].vae_scale_factor == 16  # the model's sample size
    assert sdcore.embedded.CONFIGS["sdxl"]["unet"]["sample_size"] * 8 == 1024


def test_fp16_keeps_a_force_upcast_vae_in_float32(saved):
    _, _, paths = saved
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base"], dtype=torch.float16)
    assert pipe.dtype == torch.float16 and next(pipe.vae.parameters()).dtype == torch.float32
    assert next(pipe.text_encoder_2.parameters()).dtype == torch.float16


def test_vae_replacement_and_nan_decode_names_the_vae(saved):
    from sdcore.models import AutoencoderKL

    _, ours, paths = saved
    vae = AutoencoderKL.from_pretrained(paths["base"] / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))  # a VAE whose decode goes NaN
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base"], vae=vae)
    assert pipe.vae is vae
    with pytest.raises(sdcore.NonFiniteError, match=r"VAE decode.*VAE \(the vae= replacement\) ran in float32"):
        pipe(PROMPT, latents=_latents(), num_inference_steps=1, output_type="np", progress=False)


def test_encoder_widths_must_add_up(saved):
    _, ours, _ = saved
    base = ours["base"]
    with pytest.raises(ValueError, match=r"hidden sizes 24 \+ 16 = 40 do not add up to the UNet's "
                                         r"cross_attention_dim 16"):
        StableDiffusionXLPipeline(base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer,
                                  base.tokenizer_2, ours["refiner"].unet, base.scheduler)


def test_wrong_number_of_time_ids_is_named(saved):
    _, ours, _ = saved
    base = ours["base"]
    with pytest.raises(ValueError, match=r"5 time ids \(requires_aesthetics_score=True\).*"
                                         r"projection_class_embeddings_input_dim is 64"):
        StableDiffusionXLImg2ImgPipeline(
            base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2, base.unet,
            base.scheduler, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="requires_aesthetics_score .*StableDiffusionXLImg2ImgPipeline"):
        StableDiffusionXLPipeline.from_pipe(ours["refiner"])(PROMPT, num_inference_steps=1, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=["a", "b"], prompt_2=["c"]), r"prompt_2: 1 entries for 2 prompts"),
    (dict(prompt=["a", "b"], negative_prompt_2=["c", "d", "e"]), r"negative_prompt_2: 3 entries for 2 prompts"),
    (dict(prompt="a", original_size=(64,)), r"original_size must be two numbers"),
    (dict(prompt="a", crops_coords_top_left="0,0"), r"crops_coords_top_left must be two numbers"),
    (dict(prompt="a", denoising_end=1.5), r"denoising_end must be a float strictly between 0 and 1"),
])
def test_bad_input_is_named(saved, kwargs, match):
    _, ours, _ = saved
    with pytest.raises(ValueError, match=match):
        ours["base"](num_inference_steps=1, progress=False, **kwargs)


def test_refiner_bad_input_is_named(saved):
    _, ours, _ = saved
    refiner = ours["refiner"]
    with pytest.raises(ValueError, match=r"denoising_start 0.8 must be below denoising_end 0.5"):
        refiner(PROMPT, image=_latents(), denoising_start=0.8, denoising_end=0.5, progress=False)
    with pytest.raises(ValueError, match=r"denoising_start 0.9999 with 2 steps leaves no step to run"):
        refiner(PROMPT, image=_latents(), denoising_start=0.9999, num_inference_steps=2, progress=False)


def test_each_image_of_a_batch_is_the_image_made_alone(saved):
    """With negative micro-conditioning that differs from the positive, every image's rows of the time ids stay
    its own (diffusers repeats the [negative, positive] pair, which mixes them up past one image), and a seed
    gives the same image again."""
    _, ours, _ = saved
    kwargs = dict(num_inference_steps=2, output_type="latent", progress=False, negative_prompt=NEGATIVE,
                  negative_original_size=(32, 32), negative_target_size=(48, 48))
    both = ours["base"]([PROMPT, "a dog"], latents=torch.cat([_latents(1), _latents(2)]), **kwargs).images
    alone = [ours["base"](p, latents=_latents(s), **kwargs).images for p, s in ((PROMPT, 1), ("a dog", 2))]
    assert _max_diff(both, torch.cat(alone)) <= 1e-4  # batching changes float sums only
    first, again = (ours["base"](PROMPT, seed=5, **kwargs) for _ in range(2))
    assert first.seeds == [5] and torch.equal(first.images, again.images)
