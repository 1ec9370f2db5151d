"""The whole pipeline against diffusers' StableDiffusionPipeline / Img2ImgPipeline on the same saved random
weights (CPU, fp32), plus what a user relies on: seeds, determinism, sizes, long prompts, callbacks, loading."""
import copy
import logging

import numpy as np
import pytest
import torch

import sdcore
from sdcore import loading
from sdcore.pipelines import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
PROMPT, NEGATIVE = "a photo of a cat", "blurry"


def _perturb(model, scale=0.05):
    with torch.no_grad():  # random init leaves norms at identity and some projections at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _diffusers_pipeline():
    torch.manual_seed(0)
    unet = _perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8))
    vae = _perturb(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    text_encoder = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, vocab_size=49408,
        max_position_embeddings=77, projection_dim=32)), scale=0.02)
    scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULE)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=loading.default_tokenizer(),
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref = _diffusers_pipeline()
    ref.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("sd")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


@pytest.fixture(scope="module")
def pipe(saved):
    return StableDiffusionPipeline.from_pretrained(saved[1])


def _latents(seed=1, batch=1):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "EulerDiscreteScheduler"])
def test_txt2img_matches_diffusers(saved, pipe, backend, scheduler):
    ref, _ = saved
    ref.scheduler = getattr(diffusers, scheduler).from_config(SD15_SCHEDULE)
    pipe.scheduler = getattr(sdcore.schedulers, scheduler).from_config(SD15_SCHEDULE)
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, output_type="np")
    want = ref(PROMPT, latents=_latents(), **kwargs).images
    with sdcore.use_backend(backend):
        got = pipe(PROMPT, latents=_latents(), progress=False, **kwargs).images
    assert got.shape == want.shape == (1, 16, 16, 3)
    assert _max_diff(got, want) <= 1e-4


@pytest.mark.parametrize("extra", [dict(guidance_rescale=0.7), dict(guidance_scale=1.0),
                                   dict(num_images_per_prompt=2)])
def test_options_match_diffusers(saved, pipe, extra):
    ref, _ = saved
    ref.scheduler = diffusers.DDIMScheduler.from_config(SD15_SCHEDULE)
    pipe.scheduler = sdcore.schedulers.DDIMScheduler.from_config(SD15_SCHEDULE)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 7.5, "output_type": "np", **extra}
    latents = _latents(batch=extra.get("num_images_per_prompt", 1))
    want = ref([PROMPT], latents=latents, **kwargs).images
    got = pipe([PROMPT], latents=latents, progress=False, **kwargs).images
    assert _max_diff(got, want) <= 1e-4


def test_clip_skip(saved, pipe):
    # diffusers 0.42's own clip_skip path reads text_encoder.text_model, which transformers 5 removed; so the
    # embeddings it would compute (layer -(clip_skip + 1), through the final LayerNorm, on the prompt only) go
    # in as prompt_embeds.
    ref, _ = saved
    ref.scheduler = diffusers.DDIMScheduler.from_config(SD15_SCHEDULE)
    pipe.scheduler = sdcore.schedulers.DDIMScheduler.from_config(SD15_SCHEDULE)
    enc, tok = ref.text_encoder, ref.tokenizer
    ids = lambda text: tok([text], padding="max_length", max_length=77, return_tensors="pt").input_ids  # noqa: E731
    with torch.no_grad():
        cond = enc.final_layer_norm(enc(ids(PROMPT), output_hidden_states=True).hidden_states[-2])
        uncond = enc(ids(""))[0]
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=_latents(), **kwargs).images
    got = pipe(PROMPT, clip_skip=1, latents=_latents(), progress=False, **kwargs).images
    assert _max_diff(got, want) <= 1e-4
    plain = pipe(PROMPT, latents=_latents(), progress=False, **kwargs).images
    assert _max_diff(got, plain) > 1e-3


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_img2img_matches_diffusers(saved, pipe, scheduler):
    from PIL import Image

    ref = diffusers.StableDiffusionImg2ImgPipeline(**saved[0].components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, scheduler).from_config(SD15_SCHEDULE)
    ours = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    ours.scheduler = getattr(sdcore.schedulers, scheduler).from_config(SD15_SCHEDULE)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    kwargs = dict(strength=0.6, num_inference_steps=5, guidance_scale=6.0, output_type="np")
    want = ref(PROMPT, image=image, generator=torch.Generator().manual_seed(4), **kwargs).images
    got = ours(PROMPT, image, generator=torch.Generator().manual_seed(4), progress=False, **kwargs).images
    assert _max_diff(got, want) <= 1e-4


def test_seeds_are_reported_and_reproducible(pipe):
    pipe.set_scheduler("euler-a")  # stochastic steps too
    kwargs = dict(num_inference_steps=3, output_type="pt", progress=False)
    a = pipe(PROMPT, seed=7, num_images_per_prompt=2, **kwargs)
    b = pipe(PROMPT, seed=7, num_images_per_prompt=2, **kwargs)
    assert a.seeds == [7, 8]
    assert torch.equal(a.images, b.images)  # bitwise: same seed, device, dtype, backend
    c = pipe(PROMPT, seed=9, num_images_per_prompt=2, **kwargs)
    assert not torch.allclose(a.images, c.images)
    fresh = pipe(PROMPT, **kwargs)
    assert isinstance(fresh.seeds[0], int)
    again = pipe(PROMPT, seed=fresh.seeds[0], **kwargs)
    assert torch.equal(fresh.images, again.images)


def test_output_types(pipe):
    kwargs = dict(num_inference_steps=2, seed=0, progress=False)
    pil = pipe(PROMPT, **kwargs).images
    assert pil[0].size == (16, 16) and pil[0].mode == "RGB"
    arr = pipe(PROMPT, output_type="np", **kwargs).images
    assert arr.shape == (1, 16, 16, 3) and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    assert pipe(PROMPT, output_type="latent", **kwargs).images.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPT, output_type="jpeg", **kwargs)


def test_bad_sizes_and_latents_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="height must be a multiple of 2"):
        pipe(PROMPT, height=15, width=16, progress=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(PROMPT, latents=torch.zeros(1, 4, 3, 3), progress=False)
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipe.set_scheduler("heun")


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    prompt = " ".join(["cat"] * 80) + " zebra giraffe"
    with caplog.at_level(logging.WARNING, logger="sdcore"):
        pipe(prompt, num_inference_steps=1, seed=0, output_type="latent", progress=False)
    assert "zebra giraffe" in caplog.text and "truncated" in caplog.text


def test_callback_sees_every_step_and_can_change_latents(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    pipe.set_scheduler("ddim")
    out = pipe(PROMPT, num_inference_steps=3, seed=0, output_type="latent", callback_on_step_end=callback,
               progress=False)
    assert seen == [0, 1, 2] and torch.count_nonzero(out.images) == 0


def test_progress_bar_can_be_switched_off(pipe, capsys):
    pipe.set_scheduler("ddim")  # PLMS would add a step
    pipe(PROMPT, num_inference_steps=2, seed=0, output_type="latent", progress=False)
    assert "sdcore" not in capsys.readouterr().err
    pipe(PROMPT, num_inference_steps=2, seed=0, output_type="latent")
    assert "2/2" in capsys.readouterr().err


def test_pipeline_backend_argument_scopes_the_ops(saved):
    pipe = StableDiffusionPipeline.from_pretrained(saved[1], backend="reference")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(sdcore.get_backend()))
    pipe(PROMPT, num_inference_steps=1, seed=0, output_type="latent", progress=False)
    assert seen == ["reference"] and sdcore.get_backend() != "reference"


def test_missing_component_and_variant(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved[1], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        StableDiffusionPipeline.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusionPipeline.from_pretrained(tmp_path)
    fp16 = tmp_path / "fp16"
    copy.deepcopy(saved[0]).to(torch.float16).save_pretrained(fp16, safe_serialization=True, variant="fp16")
    pipe = StableDiffusionPipeline.from_pretrained(fp16, variant="fp16", dtype=torch.float32)
    assert pipe.dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        StableDiffusionPipeline.from_pretrained(fp16)  # no plain weights there


def test_from_single_file_equals_from_pretrained(saved, pipe, tmp_path):
    from safetensors.torch import save_file
    from test_single_file import clip_to_ldm, unet_to_ldm, vae_to_ldm

    ref = saved[0]
    ckpt = {**unet_to_ldm(ref.unet.state_dict(), ref.unet.config), **vae_to_ldm(ref.vae.state_dict(), ref.vae.config),
            **clip_to_ldm(ref.text_encoder.state_dict(), 77)}
    save_file(ckpt, str(tmp_path / "sd.safetensors"))
    # Heads and norm groups are not in the tensors: this small model's differ from SD's.
    single = StableDiffusionPipeline.from_single_file(
        tmp_path / "sd.safetensors", num_heads=2, unet_overrides=dict(norm_num_groups=8),
        vae_overrides=dict(norm_num_groups=8), text_overrides=dict(num_attention_heads=4))
    assert isinstance(single.scheduler, sdcore.schedulers.PNDMScheduler)
    for p in (single, pipe):
        p.set_scheduler("ddim")
    kwargs = dict(negative_prompt=NEGATIVE, height=16, width=16, num_inference_steps=3, output_type="pt",
                  progress=False)
    want = pipe(PROMPT, latents=_latents(), **kwargs).images
    got = single(PROMPT, latents=_latents(), **kwargs).images
    assert torch.equal(got, want)


def test_set_scheduler_starts_from_the_models_config(saved):
    pipe = StableDiffusionPipeline.from_pretrained(saved[1])
    pipe.scheduler = sdcore.schedulers.EulerDiscreteScheduler(timestep_spacing="linspace", steps_offset=0)
    pipe.set_scheduler("ddim")
    assert pipe.scheduler.config["timestep_spacing"] == "leading" and pipe.scheduler.config["steps_offset"] == 1
    assert pipe.scheduler.config["beta_schedule"] == "scaled_linear"


def test_pipelines_are_exported_at_the_top():
    assert sdcore.StableDiffusionPipeline is StableDiffusionPipeline
    assert sdcore.StableDiffusionImg2ImgPipeline is StableDiffusionImg2ImgPipeline
    with pytest.raises(AttributeError):
        sdcore.NoSuchPipeline  # noqa: B018


def test_channels_last_end_to_end():
    """pipe.channels_last=True (the default on CUDA): the conv weights move once, the UNet and the VAE get NHWC
    inputs, and their feature maps stay NHWC (the spatial transformer's token view is then free); the image is
    the NCHW one up to the convolutions' rounding."""
    from sdcore import embedded

    pipe = embedded.build("tiny")
    assert pipe.channels_last is None and pipe.unet.conv_in.weight.is_contiguous()  # CPU default: NCHW
    kw = dict(height=64, width=64, num_inference_steps=2, seed=1, output_type="np", progress=False)
    nchw = pipe("a red car", **kw).images
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(
        (type(m).__name__, a[0].is_contiguous(memory_format=torch.channels_last)))) for m in
        (pipe.unet, pipe.vae.decoder, pipe.unet.down_blocks[0].resnets[0], pipe.unet.up_blocks[-1].resnets[-1])]
    pipe.channels_last = True
    weight = pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.shape[1] > 1
    nhwc = pipe("a red car", **kw).images
    for h in hooks:
        h.remove()
    assert seen and all(cl for _, cl in seen), seen
    assert np.abs(nhwc - nchw).max() < 1e-4
    pipe.channels_last = None
    assert pipe.unet.conv_in.weight.is_contiguous()
    with pytest.raises(TypeError, match="channels_last must be True, False or None"):
        pipe.channels_last = "yes"
