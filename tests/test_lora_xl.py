"""LoRA on SDXL: parity with diffusers' load_lora_weights (PEFT) for kohya (lora_unet_ / lora_te1_ / lora_te2_) and
PEFT (unet. / text_encoder. / text_encoder_2.) files on the tiny SDXL base that test_pipeline_xl saves; kohya files
in SDXL's original input_blocks / middle_block / output_blocks names; refusal of another base model's LoRA; the
generation lock; and `sdcore lora inspect` on an SDXL file."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdcore import lora
from sdcore.pipelines import StableDiffusionXLPipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")
pytest.importorskip("peft", reason="peft is diffusers' LoRA backend, the oracle here: `make test` installs it")

from test_pipeline_xl import _latents, _max_diff, saved  # noqa: E402,F401  (saved: the module's fixture)

PROMPT = "a photo of a cat"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE = ("q_proj", "k_proj", "v_proj", "out_proj")
# The tiny XL UNet's modules under SDXL's original (SGM) names, written out by hand from the LDM layout
# (input_blocks.0 = conv_in; per down block: layers_per_block=1 resnet[+attention] rows, then the downsampler row;
# middle_block = resnet, attention, resnet; per up block: 2 rows, the upsampler in the last; inside a resnet
# in_layers.2 = conv1, emb_layers.1 = time_emb_proj, out_layers.3 = conv2, skip_connection = conv_shortcut).
SGM = {
    "input_blocks.3.1.transformer_blocks.1.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
    "input_blocks.3.1.proj_in": "down_blocks.1.attentions.0.proj_in",
    "middle_block.1.transformer_blocks.0.attn2.to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj":
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "output_blocks.0.1.proj_out": "up_blocks.0.attentions.0.proj_out",
}
SGM_CONV = {
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.3.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks.3.0.out_layers.3": "up_blocks.1.resnets.1.conv2",
    "output_blocks.1.2.conv": "up_blocks.0.upsamplers.0.conv",
}


@pytest.fixture
def pipe(saved):  # a fresh one per test: the tests change its weights
    return StableDiffusionXLPipeline.from_pretrained(saved[2]["base"])


def _ref(saved):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(saved[2]["base"])
    ref.set_progress_bar_config(disable=True)
    return ref


def _modules(model, suffixes):
    return {n: m for n, m in model.named_modules() if n.endswith(suffixes) and hasattr(m, "weight")}


def _factors(g, weight, rank):
    kernel = tuple(weight.shape[2:])
    down = torch.randn(rank, weight.shape[1], *kernel, generator=g) * 0.3
    up = torch.randn(weight.shape[0], rank, *((1, 1) if kernel else ()), generator=g) * 0.3
    return down, up


def _lora(pipe, seed, kohya: bool, rank=4, alpha=2.0) -> dict:
    """A LoRA on the UNet's attention and both text encoders: kohya/A1111 keys (lora_unet_, lora_te1_, lora_te2_,
    with alpha) or diffusers/PEFT keys (unet., text_encoder., text_encoder_2.; lora_A / lora_B, scale 1)."""
    g = torch.Generator().manual_seed(seed)
    parts = (("lora_unet_", "unet.", pipe.unet, ATTN),
             ("lora_te1_text_model_", "text_encoder.text_model.", pipe.text_encoder, TE),
             ("lora_te2_text_model_", "text_encoder_2.text_model.", pipe.text_encoder_2, TE))
    out = {}
    for kohya_prefix, peft_prefix, model, suffixes in parts:
        for name, m in _modules(model, suffixes).items():
            name = name.removeprefix("text_model.")
            down, up = _factors(g, m.weight, rank)
            if kohya:
                key = kohya_prefix + name.replace(".", "_")
                out |= {key + ".lora_down.weight": down, key + ".lora_up.weight": up,
                        key + ".alpha": torch.tensor(alpha)}
            else:
                out |= {f"{peft_prefix}{name}.lora_A.weight": down, f"{peft_prefix}{name}.lora_B.weight": up}
    return out


def _run(p, **kw):
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", negative_prompt="blurry", **kw)
    if isinstance(p, StableDiffusionXLPipeline):
        kw["progress"] = False
    return p(PROMPT, latents=_latents(), **kw).images


def _snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, c).state_dict().items()}


def test_kohya_and_peft_files_and_mixing_match_diffusers(saved, pipe, tmp_path):
    ref = _ref(saved)
    save_file(_lora(pipe, 1, kohya=True), tmp_path / "style.safetensors")
    save_file(_lora(pipe, 2, kohya=False), tmp_path / "peft.safetensors")
    base, snap = _run(pipe), _snapshot(pipe)

    pipe.load_lora_weights(tmp_path / "style.safetensors", strict=True)
    ref.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    got = _run(pipe)
    assert _max_diff(got, base) > 0.02 and _max_diff(got, _run(ref)) <= 2e-3
    touched = {k for k, v in _snapshot(pipe).items() if not torch.equal(v, snap[k])}
    assert {k.split(".")[0] for k in touched} == {"unet", "text_encoder", "text_encoder_2"}

    pipe.load_lora_weights(tmp_path / "peft.safetensors", adapter_name="peft", strict=True)
    ref.load_lora_weights(str(tmp_path / "peft.safetensors"), adapter_name="peft")
    pipe.set_adapters(["style", "peft"], [0.7, 0.4])
    ref.set_adapters(["style", "peft"], [0.7, 0.4])
    assert _max_diff(_run(pipe), _run(ref)) <= 2e-3
    pipe.set_adapters("peft", 0.5)
    ref.set_adapters("peft", 0.5)
    assert pipe.get_active_adapters() == ["peft"] and _max_diff(_run(pipe), _run(ref)) <= 2e-3

    pipe.unload_lora_weights()
    assert _run(pipe).tobytes() == base.tobytes()
    assert all(torch.equal(v, snap[k]) for k, v in _snapshot(pipe).items())


def _by_names(pipe, names: dict, seed: int, sgm: bool) -> dict:
    """The same random factors under SGM names (sgm=True) or diffusers' names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for old, new in names.items():
        key = "lora_unet_" + (old if sgm else new).replace(".", "_")
        out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = \
            _factors(g, pipe.unet.get_submodule(new).weight, 3)
        out[key + ".alpha"] = torch.tensor(1.5)
    return out


def test_kohya_files_in_sdxl_original_block_names(saved, pipe, tmp_path):
    """input_blocks / middle_block / output_blocks names (attention, proj, feed-forward, and LoCon on resnet convs,
    time_emb_proj, shortcut, down/upsampler): the same merge as under diffusers' names; the attention part also
    equal to diffusers' own SGM mapping."""
    names = {**SGM, **SGM_CONV}
    save_file(_by_names(pipe, names, 5, sgm=True), tmp_path / "sgm.safetensors")
    save_file(_by_names(pipe, names, 5, sgm=False), tmp_path / "plain.safetensors")
    pipe.load_lora_weights(tmp_path / "sgm.safetensors", strict=True)
    merged = _snapshot(pipe)
    pipe.unload_lora_weights()
    base = _snapshot(pipe)
    pipe.load_lora_weights(tmp_path / "plain.safetensors", strict=True)
    plain = _snapshot(pipe)
    assert all(torch.equal(merged[k], plain[k]) for k in plain)
    assert {k for k in plain if not torch.equal(plain[k], base[k])} == {f"unet.{n}.weight" for n in names.values()}
    pipe.unload_lora_weights()

    save_file(_by_names(pipe, SGM, 6, sgm=True), tmp_path / "sgm_attn.safetensors")
    ref = _ref(saved)
    ref.load_lora_weights(str(tmp_path / "sgm_attn.safetensors"))
    pipe.load_lora_weights(tmp_path / "sgm_attn.safetensors", strict=True)
    assert _max_diff(_run(pipe), _run(ref)) <= 2e-3


def test_an_sd1_lora_is_refused_naming_the_key_and_shapes(pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # SDXL reads 40 features here, SD 1.x 768
    key = "lora_unet_" + name.replace(".", "_")
    width = pipe.unet.get_submodule(name).weight.shape[0]
    sd = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.randn(2, 64, generator=g),
          "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.randn(64, 2, generator=g),
          key + ".lora_down.weight": torch.randn(4, 768, generator=g), key + ".lora_up.weight": torch.randn(width, 4)}
    save_file(sd, tmp_path / "sd15.safetensors")
    snap = _snapshot(pipe)
    with pytest.raises(ValueError, match=rf"{key}: the adapter's update is \[{width}, 768\] but unet\.{name}\.weight "
                                         rf"is \[{width}, 40\].*Nothing was changed"):
        pipe.load_lora_weights(tmp_path / "sd15.safetensors")
    assert all(torch.equal(v, snap[k]) for k, v in _snapshot(pipe).items()) and pipe.get_active_adapters() == []


def test_a_switch_during_an_sdxl_generation_is_refused_not_raced(pipe):
    """The SDXL call holds the adapters' lock shared: switching from inside it (a callback) is an error, not a
    change under the running denoising loop (another thread's switch waits; test_lora checks that path)."""
    sd = _lora(pipe, 3, kohya=False)
    seen = []

    def callback(p, i, t, kwargs):
        with pytest.raises(RuntimeError, match="inside a generation"):
            p.load_lora_weights(sd)
        seen.append(i)
        return kwargs

    _run(pipe, callback_on_step_end=callback)
    assert seen == [0, 1] and pipe.get_active_adapters() == []


def test_inspect_describes_an_sdxl_file(tmp_path):
    """SDXL's real widths (cross-attention 2048, CLIP-L 768, bigG 1280), in SGM names: matched against the
    embedded sdxl architecture, base model SDXL."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, (out, inp) in {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
                            "lora_unet_middle_block_0_emb_layers_1": (1280, 1280),
                            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                            "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280)}.items():
        sd[key + ".lora_down.weight"] = torch.randn(8, inp, generator=g)
        sd[key + ".lora_up.weight"] = torch.randn(out, 8, generator=g)
        sd[key + ".alpha"] = torch.tensor(4.0)
    save_file(sd, tmp_path / "xl.safetensors")
    info = lora.inspect(tmp_path / "xl.safetensors")
    assert info["base"] == "SDXL" and info["checked_against"] == "sdxl"
    assert info["modules"] == 4 and info["unknown"] == []
    assert info["targets"] == {"unet": {"attn": 1, "resnet time_emb_proj": 1}, "text_encoder": {"attn": 1},
                               "text_encoder_2": {"feed-forward": 1}}
    assert "embedded sdxl architecture" in lora.report(info)
    np.testing.assert_equal(info["rank"], (8, 8))
