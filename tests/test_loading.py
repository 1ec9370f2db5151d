"""Loading: the bundled CLIP tokenizer (offline, token for token what CLIP's own BPE produces), JSON configs and
weights files that name themselves when broken, and strict, never half-done loads."""
import gzip
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from sdcore import loading

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: `make test` installs it")

# Expected ids were produced by open_clip's SimpleTokenizer (an independent implementation of CLIP's BPE)
# on the same merges file.
CASES = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "an astronaut riding a horse on mars, 4k, trending on artstation":
        [49406, 550, 18376, 6765, 320, 4558, 525, 7496, 267, 275, 330, 267, 6087, 525, 1486, 2631, 49407],
    "masterpiece, best quality, (highly detailed:1.2), 1girl, blue_hair":
        [49406, 12066, 267, 949, 3027, 267, 263, 5302, 12609, 281, 272, 269, 273, 2361, 272, 1611, 267, 1746, 318,
         2225, 49407],
    "don't stop—believin'": [49406, 847, 713, 1691, 2005, 4972, 530, 262, 49407],
    "A Photo of a CAT": [49406, 320, 1125, 539, 320, 2368, 49407],
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_default_tokenizer_matches_clip(prompt):
    assert loading.default_tokenizer()(prompt).input_ids == CASES[prompt]


def test_vocabulary_layout():
    vocab, merges = loading.clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368


def test_padding_and_truncation_to_77():
    tok = loading.default_tokenizer()
    ids = tok("x", padding="max_length").input_ids
    assert len(ids) == 77 and ids[:3] == [49406, 343, 49407] and set(ids[3:]) == {49407}
    long = tok(" ".join(["cat"] * 200), truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


class _Callback:
    """Stands in for the Python objects a training .ckpt pickles next to its tensors."""


def test_ckpt_with_pickled_objects_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": _Callback()}, path)
    with pytest.raises(ValueError, match="holds Python objects besides tensors.*weights_only=True"):
        loading.read_state_dict(path)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.equal(loading.read_state_dict(path)["state_dict"]["w"], torch.zeros(2))


def test_loading_builds_on_the_meta_device_and_assigns(tmp_path):
    # No random init for a model whose every tensor is loaded: from_pretrained's parameters are the file's.
    from safetensors.torch import save_file

    from sdcore import embedded
    from sdcore.models import AutoencoderKL

    config = embedded.CONFIGS["tiny"]["vae"]
    torch.manual_seed(0)
    state = {k: v + 1 for k, v in AutoencoderKL.from_config(config).state_dict().items()}
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    empty = loading.build_empty(AutoencoderKL, config)
    assert all(p.is_meta for p in empty.parameters())
    vae = AutoencoderKL.from_pretrained(tmp_path)
    assert not any(p.is_meta for p in vae.parameters())
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())
    assert all(p.is_contiguous() and p.requires_grad for p in vae.parameters())


# ------------------------------------------------------------------------ a diffusers-format folder to break
def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_pipeline_folder(root, seed=0):
    """A diffusers-format Stable Diffusion folder of sdcore's embedded tiny architecture with random weights,
    laid out as diffusers' save_pretrained does (the text encoder and tokenizer saved by transformers)."""
    from safetensors.torch import save_file

    from sdcore import embedded
    from sdcore.models import AutoencoderKL, UNet2DConditionModel

    cfg = embedded.CONFIGS["tiny"]
    torch.manual_seed(seed)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        _write_json(root / name / "config.json", {"_class_name": cls.__name__, **cfg[name]})
        save_file(cls.from_config(cfg[name]).state_dict(), str(root / name / "diffusion_pytorch_model.safetensors"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text"])).save_pretrained(root / "text_encoder")
    loading.default_tokenizer().save_pretrained(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json", cfg["scheduler"])
    _write_json(root / "model_index.json", {"_class_name": "StableDiffusionPipeline", "unet": ["sdcore", "UNet"],
                                            "vae": ["sdcore", "AutoencoderKL"],
                                            "text_encoder": ["transformers", "CLIPTextModel"],
                                            "tokenizer": ["transformers", "CLIPTokenizer"],
                                            "scheduler": ["diffusers", "PNDMScheduler"]})
    return root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_pipeline_folder(tmp_path_factory.mktemp("sd") / "model")


@pytest.fixture
def sd_copy(sd_folder, tmp_path):
    return Path(shutil.copytree(sd_folder, tmp_path / "model"))


def _from_pretrained(path):
    from sdcore.pipelines import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


def test_the_folder_loads(sd_folder):
    pipe = _from_pretrained(sd_folder)
    assert not any(t.is_meta for m in (pipe.unet, pipe.vae, pipe.text_encoder) for t in m.state_dict().values())


# ------------------------------------------------------------------------ JSON files name themselves
JSON_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"]


@pytest.mark.parametrize("name", JSON_FILES)
def test_invalid_json_names_its_file_line_and_column(sd_copy, name):
    target = sd_copy / name
    lines = target.read_text().splitlines()
    # drop the comma before the second top-level key: the error is at that key, column 3
    i = next(i for i in range(1, len(lines) - 1) if lines[i].endswith(",") and lines[i + 1].startswith('  "'))
    lines[i] = lines[i][:-1]
    target.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(target))}: invalid JSON \(line {i + 2} column 3: "
                                         r"Expecting ',' delimiter\)"):
        _from_pretrained(sd_copy)


@pytest.mark.parametrize("name", JSON_FILES)
@pytest.mark.parametrize("content, says", [("[1, 2]", "expected a JSON object ({...}), found a list"),
                                           ("", "empty file"), ('"x"', "found a string")])
def test_json_that_is_not_an_object_names_its_file(sd_copy, name, content, says):
    target = sd_copy / name
    target.write_text(content)
    with pytest.raises(ValueError) as info:
        _from_pretrained(sd_copy)
    assert str(info.value).startswith(f"{target}: ") and says in str(info.value)


@pytest.mark.parametrize("name, key, value", [
    ("unet/config.json", "layers_per_block", "1"), ("unet/config.json", "upcast_attention", "false"),
    ("unet/config.json", "block_out_channels", [32.0, 64.0]), ("vae/config.json", "scaling_factor", "0.18215"),
    ("vae/config.json", "latent_channels", 4.5), ("text_encoder/config.json", "hidden_size", "32"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", "1000"),
    ("scheduler/scheduler_config.json", "steps_offset", 1.5),
])
def test_wrongly_typed_config_values_are_named(sd_copy, name, key, value):
    target = sd_copy / name
    config = json.loads(target.read_text())
    config[key] = value
    target.write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        _from_pretrained(sd_copy)
    assert str(info.value).startswith(f"{target}: ") and f"{key}={value!r}" in str(info.value)


def test_scheduler_from_pretrained_names_a_broken_file(tmp_path):
    from sdcore.schedulers import DDIMScheduler

    (tmp_path / "scheduler_config.json").write_text('{"beta_start": 0.00085,\n "beta_end": }')
    with pytest.raises(ValueError, match=r"scheduler_config\.json: invalid JSON \(line 2 column 14: Expecting value"):
        DDIMScheduler.from_pretrained(tmp_path)


def test_per_block_lists_and_nulls_pass_the_type_check():
    loading.check_config_types({"attention_head_dim": [5, 10, 20, 20], "sample_size": None, "norm_eps": 1},
                               {"attention_head_dim": 8, "sample_size": 32, "norm_eps": 1e-5}, "x", per_block=True)
    with pytest.raises(ValueError, match=r"x: wrongly typed config values: attention_head_dim=\[5, 'a'\]"):
        loading.check_config_types({"attention_head_dim": [5, "a"]}, {"attention_head_dim": 8}, "x", per_block=True)


# ------------------------------------------------------------------------ a file that is not weights says what it is
NOT_WEIGHTS = {
    "empty": (b"", r"empty file \(0 bytes\)"),
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 3438167536\n",
            r"a Git LFS pointer \(135 bytes\), not the weights of 3438167536 bytes: .* Run `git lfs pull`"),
    "html": (b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n",
             "an HTML page, not weights: a failed download"),
    "gzip": (gzip.compress(b"\0" * 100), "gzip-compressed data"),
    "text": (b'{"error":"Repository Not Found"}', "a text file, not weights .it starts: '\\{\"error\""),
    "random": (bytes(range(7, 107)), "neither a safetensors file nor a PyTorch checkpoint .it starts with the "
                                     "bytes 07 08 09"),
    "pickle-like": (b"\x80\x02" + bytes(range(200, 250)), "corrupt or truncated pickle .legacy torch.save. file: .*"
                                                         "Unsupported operand"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".ckpt"])
@pytest.mark.parametrize("case", list(NOT_WEIGHTS))
def test_a_file_that_is_not_weights_says_what_it_is(tmp_path, case, suffix):
    data, says = NOT_WEIGHTS[case]
    path = tmp_path / f"model{suffix}"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        loading.read_state_dict(path)
    assert re.match(rf"{re.escape(str(path))}: {says}", str(info.value)), str(info.value)
    assert "Python objects" not in str(info.value)


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("unet/config.json", "{}")
    with pytest.raises(ValueError, match=r"model\.ckpt: a zip archive but not a torch\.save checkpoint \(no data"
                                         r"\.pkl; it holds unet/config\.json\)"):
        loading.read_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".safetensors"])
def test_torch_checkpoints_load_whatever_their_suffix(tmp_path, legacy, suffix):
    state = {"w": torch.randn(3, 4), "step": torch.tensor(7)}
    path = tmp_path / f"model{suffix}"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    got = loading.read_state_dict(path)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_safetensors_under_another_suffix_loads(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.bin"))
    assert torch.equal(loading.read_state_dict(tmp_path / "model.bin")["w"], torch.ones(2))


def test_a_folder_is_not_a_weights_file(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a weights file .* use from_pretrained"):
        loading.read_state_dict(tmp_path)


# ------------------------------------------------------------------------ strict, never half loaded
def test_a_failed_load_assigns_nothing():
    module = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"src: wrong dtypes: bias: file int64 vs model float32"):
        loading.load_weights(module, {"weight": torch.ones(2, 3), "bias": torch.ones(2, dtype=torch.int64)}, "src")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
                                   torch.complex64])
def test_float_weights_stored_as_another_kind_are_refused(dtype):
    with pytest.raises(ValueError, match=rf"src: wrong dtypes: weight: file {str(dtype)[6:]} vs model float32"):
        loading.load_weights(torch.nn.Linear(3, 2), {"weight": torch.ones(2, 3).to(dtype), "bias": torch.ones(2)},
                             "src")


def test_entries_that_are_not_tensors_are_named():
    with pytest.raises(ValueError, match=r"src: entries that are not tensors: bias \(int\)"):
        loading.load_weights(torch.nn.Linear(3, 2), {"weight": torch.ones(2, 3), "bias": 3}, "src")


def test_vae_folder_with_int_weights_is_refused(sd_copy):
    from safetensors.torch import load_file, save_file

    target = sd_copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(target))
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].to(torch.int32)
    save_file(state, str(target))
    with pytest.raises(ValueError, match=rf"{re.escape(str(target))}: wrong dtypes: decoder\.conv_out\.weight: "
                                         "file int32 vs model float32"):
        _from_pretrained(sd_copy)


def test_configs_diffusers_writes_pass_the_type_check(tmp_path):
    """The type check must not refuse what diffusers itself writes: its UNet (SD 1.5 and 2.1 settings), VAE and
    every scheduler sdcore has, saved by diffusers and read back."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (the oracle)")
    from sdcore import schedulers
    from sdcore.models import unet, vae

    with torch.device("meta"):
        models = {"sd15": (diffusers.UNet2DConditionModel(cross_attention_dim=768), unet.DEFAULTS),
                  "sd21": (diffusers.UNet2DConditionModel(attention_head_dim=[5, 10, 20, 20], upcast_attention=True,
                                                          use_linear_projection=True), unet.DEFAULTS),
                  "vae": (diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512)), vae.DEFAULTS)}
    for name, (model, defaults) in models.items():
        model.save_config(tmp_path / name)
        config = loading.read_json(tmp_path / name / "config.json")
        loading.check_config_types(config, defaults, name, per_block=True)
    for name in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "DPMSolverMultistepScheduler", "LMSDiscreteScheduler"):
        extra = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}  # sdcore's PNDM is PLMS only
        getattr(diffusers, name)(beta_schedule="scaled_linear", **extra).save_config(tmp_path / name)
        getattr(schedulers, name).from_pretrained(tmp_path / name)
