"""sdcore.loading.single_file_xl on tiny random SDXL base and refiner models written in Stability's original
(SGM) layout. The layout is made here by an inverse mapping (diffusers -> SGM) that diffusers' own single-file
converters check first (the oracle); then sdcore's converted state dicts and configs must equal what diffusers
saved, every key and bitwise every value."""
import json
import re

import numpy as np
import pytest
import torch

from sdcore.loading import single_file as sf, single_file_xl as xl

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (the conversion oracle)")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
safetensors_torch = pytest.importorskip("safetensors.torch")
from diffusers.loaders import single_file_utils as oracle  # noqa: E402
from test_single_file import _perturbed, _plain, assert_same, clip_to_ldm, unet_to_ldm, vae_to_ldm  # noqa: E402

HEADS = 16  # channels per head: small stand-in for SDXL's 64
# CLIP's real vocabulary and context: the pipeline tests run the bundled tokenizer on these encoders.
CLIP_L = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
BIG_G = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             max_position_embeddings=77, hidden_act="gelu", projection_dim=24)
# SDXL's shapes in small: text_time = pooled (24) + 6 (base) or 5 (refiner) time ids x 8; 1024 px over a 2x VAE.
BASE_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=[1, 2, 3],
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=[2, 4, 4], use_linear_projection=True, cross_attention_dim=64 + 32,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8, sample_size=512, upcast_attention=False)
REFINER_UNET = dict(BASE_UNET, block_out_channels=(32, 64, 64, 64), transformer_layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=[2, 4, 4, 4], cross_attention_dim=32,
                    projection_class_embeddings_input_dim=24 + 5 * 8)
VAE = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, sample_size=1024,
           scaling_factor=0.13025, force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2)


# ------------------------------------------------------------------------ diffusers -> SGM (the test's own)
def unet_to_sgm(sd, cfg):
    added = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out = unet_to_ldm({k: v for k, v in sd.items() if not k.startswith("add_embedding.")}, cfg)
    for k, v in sd.items():
        if k.startswith("add_embedding."):
            module, param = k.rsplit(".", 1)
            out[f"model.diffusion_model.{added[module]}.{param}"] = v.clone()
    return out


def clip_l_to_sgm(sd):
    old = "cond_stage_model.transformer."
    return {"conditioner.embedders.0.transformer." + k[len(old):]: v
            for k, v in clip_to_ldm(sd, CLIP_L["max_position_embeddings"]).items()}


def big_g_to_sgm(sd, prefix):
    """CLIPTextModelWithProjection -> OpenCLIP: q/k/v stacked into in_proj, the projection as x @ P."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T, "logit_scale": torch.tensor(4.6)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in names.items():
            for param in ("weight", "bias"):
                out[f"{dst}{b}.{param}"] = sd[f"{src}{a}.{param}"]
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{param}"] for x in "qkv"])
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    made = dict(unet=_perturbed(diffusers.UNet2DConditionModel(**BASE_UNET), 1),
                refiner_unet=_perturbed(diffusers.UNet2DConditionModel(**REFINER_UNET), 2),
                vae=_perturbed(diffusers.AutoencoderKL(**VAE), 3),
                text_encoder=_perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)), 4),
                text_encoder_2=_perturbed(transformers.CLIPTextModelWithProjection(
                    transformers.CLIPTextConfig(**BIG_G)), 5))
    root = tmp_path_factory.mktemp("xl_saved")
    for name, model in made.items():
        model.save_pretrained(root / name, safe_serialization=True)
    return made, root


def saved(root, name):
    """What diffusers / transformers wrote for a component: (config.json, its tensors)."""
    weights = next((root / name).glob("*.safetensors"))
    return json.loads((root / name / "config.json").read_text()), safetensors_torch.load_file(str(weights))


@pytest.fixture(scope="module")
def ckpts(models):
    m, _ = models
    vae = vae_to_ldm(m["vae"].state_dict(), m["vae"].config)
    big_g = m["text_encoder_2"].state_dict()
    base = {**unet_to_sgm(m["unet"].state_dict(), m["unet"].config), **vae,
            **clip_l_to_sgm(m["text_encoder"].state_dict()), **big_g_to_sgm(big_g, xl.BIG_G["sdxl"])}
    refiner = {**unet_to_sgm(m["refiner_unet"].state_dict(), m["refiner_unet"].config), **vae,
               **big_g_to_sgm(big_g, xl.BIG_G["sdxl_refiner"])}
    return dict(base=base, refiner=refiner)


@pytest.fixture(scope="module")
def files(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("xl_single_file")
    for name, state in ckpts.items():
        safetensors_torch.save_file(state, str(root / f"{name}.safetensors"))
    return root


def _no_position_ids(sd):
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def test_inverse_mapping_agrees_with_diffusers_converters(models, ckpts):
    m, _ = models
    for unet, ckpt in (("unet", ckpts["base"]), ("refiner_unet", ckpts["refiner"])):
        assert_same(oracle.convert_ldm_unet_checkpoint(ckpt, dict(m[unet].config)), m[unet].state_dict())
        assert_same(oracle.convert_ldm_vae_checkpoint(ckpt, dict(m["vae"].config)), m["vae"].state_dict())
    assert_same(_plain(oracle.convert_ldm_clip_checkpoint(ckpts["base"])), _plain(m["text_encoder"].state_dict()))
    for ckpt, family in ((ckpts["base"], "sdxl"), (ckpts["refiner"], "sdxl_refiner")):
        big_g = oracle.convert_open_clip_checkpoint(m["text_encoder_2"], ckpt, prefix=xl.BIG_G[family])
        assert_same(_no_position_ids(big_g), _no_position_ids(m["text_encoder_2"].state_dict()))


def _same_config(got: dict, want: dict, what: str):
    """Every key sdcore's config has is in diffusers' saved config.json, with the same value."""
    listed = lambda config: {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}  # noqa: E731
    got, want = listed(got), listed(want)
    assert set(got) <= set(want), f"{what}: keys diffusers does not write: {set(got) - set(want)}"
    assert {k: want[k] for k in got} == got, what


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_components_equal_what_diffusers_saved(models, files, name):
    _, root = models
    got = xl.load_components(files / f"{name}.safetensors", head_channels=HEADS)
    assert got["family"] == ("sdxl" if name == "base" else "sdxl_refiner")
    unet = "unet" if name == "base" else "refiner_unet"
    for component, key in ((unet, "unet"), ("vae", "vae"), ("text_encoder_2", "text_2")):
        config, state = saved(root, component)
        assert_same(got[f"{key}_state"], state)
        _same_config(got[f"{key}_config"], config, component)
    if name == "base":
        config, state = saved(root, "text_encoder")
        assert_same(_no_position_ids(got["text_state"]), _no_position_ids(state))
        _same_config(got["text_config"], config, "text_encoder")
    else:
        assert got["text_config"] is None and got["text_state"] is None
    assert got["unet_config"]["transformer_layers_per_block"] == ([1, 2, 3] if name == "base" else 2)
    assert got["unet_config"]["addition_time_embed_dim"] == 8
    assert got["vae_config"]["scaling_factor"] == 0.13025 and got["vae_config"]["force_upcast"] is True
    assert got["pipeline_config"] == dict(requires_aesthetics_score=name == "refiner",
                                          force_zeros_for_empty_prompt=name == "base")
    assert got["text_2_state"]["text_projection.weight"].shape == (24, 32)  # OpenCLIP's [32, 24], transposed


def test_default_scheduler_is_diffusers_sdxl_euler(ckpts):
    from sdcore import schedulers

    config = xl.detect(ckpts["base"], head_channels=HEADS)["scheduler_config"]
    assert config["_class_name"] == "EulerDiscreteScheduler"
    ours = schedulers.EulerDiscreteScheduler.from_checked_config(config, "test")
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps.float()) and torch.allclose(ours.sigmas.float(), ref.sigmas.float())


def test_full_size_sdxl_layouts_give_the_published_configs():
    """SDXL base and refiner at full size (shapes only, on the meta device): the sizes diffusers publishes."""
    base = dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=[1, 2, 10],
                attention_head_dim=[5, 10, 20], cross_attention_dim=2048, projection_class_embeddings_input_dim=2816)
    refiner = dict(block_out_channels=(384, 768, 1536, 1536), transformer_layers_per_block=4,
                   attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280,
                   projection_class_embeddings_input_dim=2560)
    big_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**big_g))
        clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768))
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        for sizes, kind in ((base, "sdxl"), (refiner, "sdxl_refiner")):
            cfg = dict(BASE_UNET if kind == "sdxl" else REFINER_UNET, **sizes, addition_time_embed_dim=256,
                       sample_size=128)
            unet = diffusers.UNet2DConditionModel(**cfg)
            state = {**unet_to_sgm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config),
                     **big_g_to_sgm(text_2.state_dict(), xl.BIG_G[kind])}
            if kind == "sdxl":
                state.update(clip_l_to_sgm(clip_l.state_dict()))
            info = xl.detect(state)
            assert info["family"] == kind
            _same_config(info["unet_config"], dict(unet.config), kind)
            assert {k: info["text_2_config"][k] for k in big_g} == big_g
            assert info["vae_config"]["sample_size"] == 1024


# ------------------------------------------------------------------------ detection and errors
def test_model_type_tells_the_four_apart(ckpts):
    t = torch.zeros(1)
    assert sf.model_type({"model.diffusion_model.x": t, "cond_stage_model.transformer.x": t}) == "sd1"
    assert sf.model_type({"model.diffusion_model.x": t, "cond_stage_model.model.token_embedding.weight": t}) == "sd2"
    assert sf.model_type(ckpts["base"]) == "sdxl" and sf.model_type(ckpts["refiner"]) == "sdxl_refiner"
    with pytest.raises(ValueError, match=r"no text encoder: expected .*; found \['conditioner.embedders.3.foo'\]"):
        sf.model_type({"model.diffusion_model.x": t, "conditioner.embedders.3.foo.weight": t})
    with pytest.raises(ValueError, match="an SDXL checkpoint, not SD 1.x / 2.x: load it with"):
        sf.detect(ckpts["base"])
    with pytest.raises(ValueError, match="an SDXL refiner checkpoint"):
        sf.detect(ckpts["refiner"])
    with pytest.raises(ValueError, match="an SD 1.x checkpoint, not SDXL"):
        xl.detect({"model.diffusion_model.x": t, "cond_stage_model.transformer.x": t})


def test_truncated_file_names_the_file(files, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((files / "base.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*corrupt or truncated"):
        xl.load_components(bad)


@pytest.mark.parametrize("key", ["model.diffusion_model.label_emb.0.2.bias",
                                 "model.diffusion_model.input_blocks.8.1.transformer_blocks.2.attn2.to_k.weight",
                                 "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                                 "conditioner.embedders.1.model.text_projection",
                                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"])
def test_missing_tensor_is_named(ckpts, tmp_path, key):
    state = dict(ckpts["base"])
    del state[key]
    path = tmp_path / "missing.safetensors"
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"missing\.safetensors: .*missing tensors: {re.escape(key)}"):
        xl.load_components(path, head_channels=HEADS)


def test_missing_text_encoder_and_stray_tensors_are_named(ckpts):
    no_clip = {k: v for k, v in ckpts["base"].items() if not k.startswith(xl.CLIP_L)}
    with pytest.raises(ValueError, match=r"missing tensors: conditioner\.embedders\.0\.transformer\.\*"):
        xl.load_components("base.safetensors", state=no_clip, head_channels=HEADS)
    stray = {**ckpts["refiner"], "conditioner.embedders.0.model.transformer.resblocks.0.extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"tensors not converted: conditioner\.embedders\.0\.model\.transformer"):
        xl.load_components("refiner.safetensors", state=stray, head_channels=HEADS)
    wide = {**ckpts["base"], "model.diffusion_model.label_emb.0.0.weight": torch.zeros(64, 24 + 6 * 8 + 1)}
    with pytest.raises(ValueError, match=r"label_emb\) takes 73 inputs, which is not the pooled text width 24 plus "
                                         r"6 time ids"):
        xl.detect(wide, head_channels=HEADS)


# ------------------------------------------------------------------------ whole pipelines
@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    """The same models saved by diffusers as SDXL pipeline folders, base and refiner: what the files must equal."""
    from sdcore import loading

    m, _ = models
    euler = diffusers.EulerDiscreteScheduler.from_config({k: v for k, v in xl.EULER.items() if k != "_class_name"})
    root = tmp_path_factory.mktemp("xl_folders")
    diffusers.StableDiffusionXLPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"],
        tokenizer=loading.default_tokenizer(), tokenizer_2=loading.default_tokenizer(pad_token="!"), unet=m["unet"],
        scheduler=euler).save_pretrained(root / "base", safe_serialization=True)
    diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=m["vae"], text_encoder=None, text_encoder_2=m["text_encoder_2"], tokenizer=None,
        tokenizer_2=loading.default_tokenizer(pad_token="!"), unet=m["refiner_unet"], scheduler=euler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    ).save_pretrained(root / "refiner", safe_serialization=True)
    return root


def test_single_files_make_the_same_images_as_the_diffusers_folders(files, folders):
    """Base (txt2img, then the hand-off to the refiner in latent space) and refiner, each loaded from its single
    file and from the diffusers folder: bitwise the same images."""
    from sdcore.pipelines import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, from_single_file

    base_file = StableDiffusionXLPipeline.from_single_file(files / "base.safetensors", head_channels=HEADS)
    refiner_file = from_single_file(files / "refiner.safetensors", head_channels=HEADS)
    assert type(refiner_file) is StableDiffusionXLImg2ImgPipeline and refiner_file.requires_aesthetics_score
    assert refiner_file.text_encoder is None and base_file.force_zeros_for_empty_prompt
    assert base_file.tokenizer_2.pad_token == "!" and type(base_file.scheduler).__name__ == "EulerDiscreteScheduler"
    base_dir = StableDiffusionXLPipeline.from_pretrained(folders / "base")
    refiner_dir = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders / "refiner")
    common = dict(num_inference_steps=4, seed=7, progress=False)
    results = []
    for base, refiner in ((base_file, refiner_file), (base_dir, refiner_dir)):
        latents = base("a red cube", negative_prompt="blurry", height=64, width=64, denoising_end=0.5,
                       output_type="latent", **common).images
        image = refiner("a red cube", image=latents, denoising_start=0.5, output_type="np", **common).images
        pictures = base("a blue ball", height=64, width=48, output_type="np", **common).images
        results.append((latents, image, pictures))
    for got, want in zip(*results):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(results[0][2]).std() > 0.01  # a picture, not a constant


def test_from_single_file_picks_the_pipeline_and_refuses_the_wrong_one(files, ckpts, tmp_path):
    from sdcore.pipelines import (StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                                  StableDiffusionXLPipeline, from_single_file)

    assert type(from_single_file(files / "base.safetensors", head_channels=HEADS)) is StableDiffusionXLPipeline
    assert type(from_single_file(files / "base.safetensors", img2img=True,
                                 head_channels=HEADS)) is StableDiffusionXLImg2ImgPipeline
    with pytest.raises(ValueError, match=r"base\.safetensors: an SDXL checkpoint, not SD 1\.x / 2\.x"):
        StableDiffusionPipeline.from_single_file(files / "base.safetensors")
    unet_only = tmp_path / "unet_only.safetensors"
    safetensors_torch.save_file({k: v for k, v in ckpts["base"].items() if k.startswith("model.")}, str(unet_only))
    with pytest.raises(ValueError, match=r"unet_only\.safetensors: no text encoder"):
        from_single_file(unet_only)


def test_sdcore_generate_runs_an_sdxl_single_file(models, tmp_path, capsys):
    """`sdcore generate --model FILE` on an SDXL file: the XL pipeline, picked from the tensors. The CLI reads
    heads as SDXL has them (64 channels each), so this model's widths are multiples of 64."""
    from sdcore import cli
    from sdcore.pipelines import StableDiffusionXLPipeline

    m, _ = models
    torch.manual_seed(1)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**dict(CLIP_L, num_attention_heads=1)))
    text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **dict(BIG_G, hidden_size=64, num_attention_heads=1)))
    unet = diffusers.UNet2DConditionModel(**dict(
        BASE_UNET, block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=[1, 2],
        attention_head_dim=[1, 2], cross_attention_dim=128))
    state = {**unet_to_sgm(_perturbed(unet, 6).state_dict(), unet.config),
             **vae_to_ldm(m["vae"].state_dict(), m["vae"].config),
             **clip_l_to_sgm(_perturbed(text, 7).state_dict()),
             **big_g_to_sgm(_perturbed(text_2, 8).state_dict(), xl.BIG_G["sdxl"])}
    path = tmp_path / "sdxl.safetensors"
    safetensors_torch.save_file(state, str(path))
    code = cli.main(["generate", "a red car", "--model", str(path), "--size", "64x64", "--steps", "2", "--seed", "4",
                     "--no-progress", "--out", str(tmp_path / "x.png")])
    assert code == 0, capsys.readouterr().err
    pipe = cli.load_pipeline(str(path), "tiny", "cpu", torch.float32, None)
    assert type(pipe) is StableDiffusionXLPipeline
    want = pipe("a red car", height=64, width=64, num_inference_steps=2, seed=4, progress=False).images[0]
    from PIL import Image

    got = Image.open(tmp_path / "x.png")
    assert np.array_equal(np.asarray(got), np.asarray(want)) and "CFG scale: 5.0" in got.info["parameters"]
