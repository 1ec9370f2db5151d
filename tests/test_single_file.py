"""sdcore.loading.single_file on small random SD 1.x / 2.x models written in the original LDM/CompVis layout.

The LDM files are made here by an inverse mapping (diffusers -> LDM) written independently of sdcore's tables,
and that mapping is itself checked against diffusers' own single-file converters (the oracle)."""
import re

import pytest
import torch

from sdcore import loading
from sdcore.loading import single_file as sf
from sdcore.models.text_encoder import build_text_encoder

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (the conversion oracle)")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
safetensors_torch = pytest.importorskip("safetensors.torch")
from diffusers.loaders import single_file_utils as oracle  # noqa: E402

SD1_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
SD2_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=[2, 4],
                use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
VAE = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
CLIP = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=64)
# SD 2.x: 24 OpenCLIP resblocks in the file (diffusers' oracle hard-codes resblocks.23 as the one to drop).
OPEN_CLIP = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=23, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="gelu", projection_dim=32)
SD2_HEAD_CHANNELS = 16  # small stand-in for SD 2.x's 64 channels per head: UNet [2, 4] heads, text 4 heads


def _perturbed(model, seed):
    """Every parameter moved by its own random amount, so a misrouted tensor can never compare equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


# ------------------------------------------------------------------------ diffusers -> LDM (the test's own)
RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_resnet(rest):
    head, tail = rest.split(".", 1)
    return f"{RESNET_TO_LDM[head]}.{tail}"


def unet_to_ldm(sd, cfg):
    n = cfg["layers_per_block"] + 1  # LDM slots per diffusers block
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if module in fixed:
            new = f"{fixed[module]}.{param}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):
            slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[m[1], m[2]]
            new = f"middle_block.{slot}." + (_ldm_resnet(m[3]) if m[1] == "resnets" else m[3])
        else:
            side, b, part, j, rest = re.match(r"(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.(.*)", key).groups()
            b, j = int(b), int(j)
            inner = f"0.{_ldm_resnet(rest)}" if part == "resnets" else f"1.{rest}"
            if part == "downsamplers":
                new = f"input_blocks.{1 + b * n + n - 1}.0.op.{param}"
            elif part == "upsamplers":
                new = f"output_blocks.{b * n + n - 1}.{2 if up_attn[b] else 1}.conv.{param}"
            else:
                slot = f"input_blocks.{1 + b * n + j}" if side == "down" else f"output_blocks.{b * n + j}"
                new = f"{slot}.{inner}"
        out["model.diffusion_model." + new] = value.clone()
    return out


def vae_to_ldm(sd, cfg):
    nb = len(cfg["block_out_channels"])
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{nb - 1 - int(m[1])}.block.", new)
        new = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{nb - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if value.ndim == 2:  # LDM's AttnBlock uses 1x1 convs
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value.clone()
    return out


def clip_to_ldm(sd, max_pos):
    out = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v.clone() for k, v in sd.items()}
    # SD 1.x files carry CLIPTextModel's position_ids buffer from the transformers of their day.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(max_pos)[None]
    return out


def open_clip_to_ldm(sd, extra_layer, layers=OPEN_CLIP["num_hidden_layers"], projection=OPEN_CLIP["projection_dim"]):
    g = torch.Generator().manual_seed(7)
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    p = "cond_stage_model.model."
    width = sd["embeddings.token_embedding.weight"].shape[1]
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"],
           p + "text_projection": torch.randn(width, projection, generator=g),
           p + "logit_scale": torch.tensor(4.6), p + "visual.proj": torch.randn(8, 8, generator=g)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for a, b in names.items():
            for param in ("weight", "bias"):
                out[f"{dst}{b}.{param}"] = sd[f"{src}{a}.{param}"]
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{param}"] for x in "qkv"])
    last = f"{p}transformer.resblocks.{layers}."  # the layer SD 2.x does not use
    out.update({last + k: v.clone() for k, v in extra_layer.items()})
    return {k: v.clone() for k, v in out.items()}


def _resblock(width, seed, mlp=2):
    g = torch.Generator().manual_seed(seed)
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
              "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
              "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (mlp * width, width),
              "mlp.c_fc.bias": (mlp * width,), "mlp.c_proj.weight": (width, mlp * width), "mlp.c_proj.bias": (width,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


DDPM_BUFFERS = {"betas": torch.linspace(0.00085, 0.012, 10), "alphas_cumprod": torch.rand(10)}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return dict(unet1=_perturbed(diffusers.UNet2DConditionModel(**SD1_UNET), 1),
                unet2=_perturbed(diffusers.UNet2DConditionModel(**SD2_UNET), 2),
                vae=_perturbed(diffusers.AutoencoderKL(**VAE), 3),
                clip1=_perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 4),
                clip2=_perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**OPEN_CLIP)), 5))


@pytest.fixture(scope="module")
def ckpts(models):
    vae = vae_to_ldm(models["vae"].state_dict(), models["vae"].config)
    sd1 = {**unet_to_ldm(models["unet1"].state_dict(), models["unet1"].config), **vae,
           **clip_to_ldm(models["clip1"].state_dict(), CLIP["max_position_embeddings"]), **DDPM_BUFFERS}
    sd2 = {**unet_to_ldm(models["unet2"].state_dict(), models["unet2"].config), **vae,
           **open_clip_to_ldm(models["clip2"].state_dict(), _resblock(OPEN_CLIP["hidden_size"], 6)), **DDPM_BUFFERS}
    return dict(sd1=sd1, sd2=sd2)


@pytest.fixture(scope="module")
def files(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    safetensors_torch.save_file(ckpts["sd1"], str(root / "sd1.safetensors"))
    safetensors_torch.save_file(ckpts["sd2"], str(root / "sd2.safetensors"))
    torch.save({"state_dict": ckpts["sd2"], "global_step": 875000}, root / "sd2_base.ckpt")
    return root


def _ema(ckpt, offset=1.0):
    """model_ema.* copies (LitEma's dot-less names) that differ from the live weights."""
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + offset for k, v in ckpt.items()
           if k.startswith("model.diffusion_model.")}
    return {**ckpt, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def _listed(config, keys):
    return {k: list(config[k]) if isinstance(config[k], tuple) else config[k] for k in keys}


def _plain(sd):
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


# ------------------------------------------------------------------------ the oracle checks the test's mapping
def test_inverse_mapping_agrees_with_diffusers_converters(models, ckpts):
    for name, ckpt in (("unet1", ckpts["sd1"]), ("unet2", ckpts["sd2"])):
        config = dict(models[name].config)
        assert_same(oracle.convert_ldm_unet_checkpoint(ckpt, config), models[name].state_dict())
        ema = oracle.convert_ldm_unet_checkpoint(_ema(ckpt), config, extract_ema=True)
        assert_same(ema, {k: v + 1.0 for k, v in models[name].state_dict().items()})
    assert_same(oracle.convert_ldm_vae_checkpoint(ckpts["sd1"], dict(models["vae"].config)),
                models["vae"].state_dict())
    assert_same(_plain(oracle.convert_ldm_clip_checkpoint(ckpts["sd1"])), models["clip1"].state_dict())
    open_clip = oracle.convert_open_clip_checkpoint(models["clip2"], ckpts["sd2"], prefix="cond_stage_model.model.")
    assert_same(_plain(open_clip), models["clip2"].state_dict())


# ------------------------------------------------------------------------ sdcore
def test_sd1_components_reproduce_the_original_state_dicts(models, files, ckpts):
    got = sf.load_components(files / "sd1.safetensors", head_channels=32)
    assert got["family"] == "sd1"
    assert_same(got["unet_state"], models["unet1"].state_dict())
    assert_same(got["vae_state"], models["vae"].state_dict())
    assert_same(got["text_state"], models["clip1"].state_dict())
    # Without a config, the VAE and CLIP converters read what they need off the tensors themselves.
    assert_same(sf.convert_vae(ckpts["sd1"]), models["vae"].state_dict())
    assert_same(sf.convert_clip(ckpts["sd1"]), models["clip1"].state_dict())


def test_sd2_open_clip_in_proj_is_split_and_last_layer_dropped(models, files):
    got = sf.load_components(files / "sd2.safetensors", head_channels=SD2_HEAD_CHANNELS)
    assert got["family"] == "sd2"
    assert_same(got["unet_state"], models["unet2"].state_dict())
    assert_same(got["vae_state"], models["vae"].state_dict())
    assert_same(got["text_state"], models["clip2"].state_dict())


SIZE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
             "transformer_layers_per_block", "norm_num_groups")
VAE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels")
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "projection_dim", "layer_norm_eps")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_detect_reads_the_sizes_off_the_tensors(models, ckpts, family):
    sd1 = family == "sd1"
    info = sf.detect(ckpts[family], head_channels=32 if sd1 else SD2_HEAD_CHANNELS)
    unet, clip = (models["unet1"], models["clip1"]) if sd1 else (models["unet2"], models["clip2"])
    assert _listed(info["unet_config"], SIZE_KEYS) == _listed(unet.config, SIZE_KEYS)
    assert _listed(info["vae_config"], VAE_KEYS) == _listed(models["vae"].config, VAE_KEYS)
    assert info["vae_config"]["scaling_factor"] == 0.18215
    want_text = dict(clip.config.to_dict())
    assert {k: info["text_config"][k] for k in TEXT_KEYS} == {k: want_text[k] for k in TEXT_KEYS}
    sched = info["scheduler_config"]
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert sched["prediction_type"] == ("epsilon" if sd1 else "v_prediction")
    assert info["unet_config"]["upcast_attention"] is (not sd1)
    assert sf.detect(ckpts[family], num_heads=2)["unet_config"]["attention_head_dim"] == 2


# SD 1.5 and 2.1 at full size (diffusers' UNet defaults are SD's sizes): the published diffusers configs.
FULL_SIZE = {"sd1": (dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                     dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768)),
             "sd2": (dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                          use_linear_projection=True, upcast_attention=True),
                     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu", projection_dim=1024))}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layouts_give_the_published_configs_with_the_documented_defaults(family):
    unet_config, text_config = FULL_SIZE[family]
    with torch.device("meta"):  # shapes only
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, **text_config))
    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    if family == "sd1":
        state.update(clip_to_ldm(clip.state_dict(), 77))
    else:
        state.update(open_clip_to_ldm(clip.state_dict(), _resblock(1024, 0, mlp=4), layers=23, projection=1024))
    info = sf.detect(state)
    keys = SIZE_KEYS + ("sample_size", "upcast_attention")
    assert _listed(info["unet_config"], keys) == _listed(unet.config, keys)
    assert info["vae_config"]["block_out_channels"] == [128, 256, 512, 512]
    assert _listed(info["text_config"], TEXT_KEYS) == _listed(clip.config.to_dict(), TEXT_KEYS)
    shapes = lambda sd: {k: v.shape for k, v in sd.items()}  # noqa: E731
    assert shapes(sf.convert_unet(state, info["unet_config"])) == shapes(unet.state_dict())
    text = sf.convert_clip if family == "sd1" else sf.convert_open_clip
    assert shapes(text(state, info["text_config"])) == shapes(clip.state_dict())


def test_models_built_from_detected_configs_compute_like_the_originals(models, files):
    from sdcore.models import AutoencoderKL

    for name, unet_name, clip_name, heads in (("sd1", "unet1", "clip1", 32), ("sd2", "unet2", "clip2", 16)):
        got = sf.load_components(files / f"{name}.safetensors", head_channels=heads)
        unet = diffusers.UNet2DConditionModel(**got["unet_config"]).eval()
        unet.load_state_dict(got["unet_state"], strict=True)
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64)
        with torch.no_grad():
            assert torch.allclose(unet(x, 10, ctx).sample, models[unet_name](x, 10, ctx).sample, atol=1e-5)
        loading.load_weights(AutoencoderKL.from_config(got["vae_config"]), got["vae_state"], "vae")
        text = build_text_encoder(got["text_config"], got["text_state"])
        want = models[clip_name]
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want.set_attn_implementation("eager")
            ref = want(ids).last_hidden_state
            assert ((text(ids).last_hidden_state - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_ckpt_with_state_dict_wrapper_and_sd2_base_global_step(models, files):
    got = sf.load_components(files / "sd2_base.ckpt", head_channels=SD2_HEAD_CHANNELS)
    assert_same(got["text_state"], models["clip2"].state_dict())
    assert got["scheduler_config"]["prediction_type"] == "epsilon"  # diffusers' global_step == 875000 heuristic
    assert got["unet_config"]["upcast_attention"] is False
    v = sf.load_components(files / "sd2_base.ckpt", head_channels=SD2_HEAD_CHANNELS, prediction_type="v_prediction")
    assert v["scheduler_config"]["prediction_type"] == "v_prediction"


def test_ema_weights_on_request(models, ckpts):
    state = _ema(ckpts["sd1"], offset=0.5)
    config = sf.detect(state)["unet_config"]
    assert sf.detect(state)["ema"]
    assert_same(sf.convert_unet(state, config, use_ema=True),
                {k: v + 0.5 for k, v in models["unet1"].state_dict().items()})
    assert_same(sf.convert_unet(state, config), models["unet1"].state_dict())  # live weights, as diffusers
    del state[next(k for k in state if k.startswith("model_ema.diffusion_model"))]
    with pytest.raises(ValueError, match="incomplete EMA weights: missing model_ema.diffusion_model"):
        sf.convert_unet(state, config, use_ema=True)


# ------------------------------------------------------------------------ errors
def test_truncated_file_names_the_file(files, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((files / "sd1.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*corrupt or truncated"):
        sf.load_components(bad)


@pytest.mark.parametrize("key", ["model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                                 "first_stage_model.decoder.up.0.block.2.conv2.bias",
                                 "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_bias"])
def test_missing_tensor_is_named(ckpts, tmp_path, key):
    state = dict(ckpts["sd1" if "model.transformer" not in key else "sd2"])
    del state[key]
    path = tmp_path / "missing.safetensors"
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"missing\.safetensors: .*missing tensors: {re.escape(key)}"):
        sf.load_components(path, head_channels=SD2_HEAD_CHANNELS)


@pytest.mark.parametrize("key", ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.extra.weight",
                                 "first_stage_model.encoder.mid.attn_1.extra", "cond_stage_model.transformer.extra"])
def test_unconverted_tensor_inside_a_component_is_named(ckpts, key):
    state = {**ckpts["sd1"], key: torch.zeros(1)}
    with pytest.raises(ValueError, match=rf"tensors not converted: {re.escape(key)}"):
        info = sf.detect(state)
        sf.convert_unet(state, info["unet_config"])
        sf.convert_vae(state, info["vae_config"])
        sf.convert_clip(state, info["text_config"])


def test_unknown_layout_says_what_was_expected(models):
    with pytest.raises(ValueError, match=r"expected the UNet under 'model\.diffusion_model\.\*'.*\['conv_in'"):
        sf.detect(models["unet1"].state_dict())  # a diffusers-format UNet is not a single-file checkpoint


def test_inpainting_unet_is_rejected(ckpts):
    state = dict(ckpts["sd1"])
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(ValueError, match="an inpainting UNet .9 input channels"):
        sf.detect(state)


def test_keys_outside_the_components_are_ignored_with_a_warning(ckpts, tmp_path, caplog):
    state = {**ckpts["sd1"], "control_model.zero_convs.0.0.weight": torch.zeros(1), "model_ema.decay": torch.ones(())}
    path = tmp_path / "extra.safetensors"
    safetensors_torch.save_file(state, str(path))
    with caplog.at_level("WARNING", logger="sdcore.loading.single_file"):
        sf.load_components(path, head_channels=32)
    # DDPM buffers (betas, alphas_cumprod) and model_ema.* are dropped silently, by design.
    assert "outside Stable Diffusion's components: ['control_model']" in caplog.text
