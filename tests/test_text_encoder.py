"""transformers' CLIPTextModel with sdcore's attention registered through AttentionInterface."""
import pytest
import torch

import sdcore
from sdcore import loading
from sdcore.models import text_encoder

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                         pad_token_id=49407)
    ref = transformers.CLIPTextModel(config).eval()
    path = tmp_path_factory.mktemp("sd")
    ref.save_pretrained(path / "text_encoder", safe_serialization=True)
    return path


def _ids():
    return loading.default_tokenizer()(["a photo of a cat", "an astronaut riding a horse"], padding="max_length",
                                       return_tensors="pt").input_ids


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_embeddings_match_transformers(saved, backend):
    ref = transformers.CLIPTextModel.from_pretrained(str(saved / "text_encoder"), attn_implementation="eager").eval()
    ours = text_encoder.load_text_encoder(saved)
    ids = _ids()
    with torch.no_grad(), sdcore.use_backend(backend):
        got = ours(ids).last_hidden_state
    want = ref(ids).last_hidden_state
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_attention_runs_through_sdcore_ops(saved):
    ours = text_encoder.load_text_encoder(saved)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        ours(_ids())
    names = [e.name for e in prof.events()]
    assert names.count("sdcore::attention") == 2, "one fused causal attention per layer"


def test_padding_mask_falls_back_with_a_reason(saved, caplog):
    from sdcore import _backend

    _backend._warned.clear()
    ref = transformers.CLIPTextModel.from_pretrained(str(saved / "text_encoder"), attn_implementation="eager").eval()
    ours = text_encoder.load_text_encoder(saved)
    ids = _ids()
    mask = (ids != 49407).long()
    mask[:, 0] = 1
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
        want = ref(ids, attention_mask=mask).last_hidden_state
    assert "explicit attention mask" in caplog.text
    keep = mask.bool()
    assert ((got - want)[keep].abs().max() / want[keep].abs().max()).item() < 1e-4


# ------------------------------------------------------------------------ strict, as the UNet and VAE are
def _broken_copy(saved, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "text_encoder" / "config.json").read_text())
    state = load_file(str(saved / "text_encoder" / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


LAYER = "encoder.layers.1.self_attn.k_proj"
BREAKAGES = {
    "missing": (lambda s: s.pop(f"{LAYER}.weight"), rf"missing tensors: {LAYER}\.weight"),
    "unexpected": (lambda s: s.update(extra=torch.zeros(2)), "unexpected tensors: extra"),
    "wrong shape": (lambda s: s.update({f"{LAYER}.bias": torch.zeros(63)}),
                    rf"wrong shapes: {LAYER}\.bias: file \(63,\) vs model \(64,\)"),
    "wrong dtype": (lambda s: s.update({f"{LAYER}.bias": s[f"{LAYER}.bias"].to(torch.int64)}),
                    rf"wrong dtypes: {LAYER}\.bias: file int64 vs model float32"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_a_broken_text_encoder_is_an_error_naming_file_and_key(saved, tmp_path, case):
    edit, says = BREAKAGES[case]
    weights = _broken_copy(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=rf"^{weights}: .*{says}"):
        text_encoder.load_text_encoder(tmp_path)


def test_files_saved_by_transformers_4_load(saved, tmp_path):
    """transformers 4.x wrote "text_model."-prefixed names and, before 4.31, the position_ids buffer (fp16 files
    sometimes as rounded floats): both load, and position_ids is made fresh."""
    def old_style(state):
        for key in list(state):
            state[f"text_model.{key.removeprefix('text_model.')}"] = state.pop(key)
        state["text_model.embeddings.position_ids"] = torch.arange(77.0).half()[None] + 0.25

    _broken_copy(saved, tmp_path, old_style)
    ref = transformers.CLIPTextModel.from_pretrained(str(saved / "text_encoder"), attn_implementation="eager").eval()
    ours = text_encoder.load_text_encoder(tmp_path)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    embeddings = getattr(ours, "text_model", ours).embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(77)[None])
    with torch.no_grad():
        want = ref(_ids()).last_hidden_state
        assert ((ours(_ids()).last_hidden_state - want).abs().max() / want.abs().max()).item() < 1e-4


def test_variant_and_bin_files(saved, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "text_encoder" / "config.json").read_text())
    state = load_file(str(saved / "text_encoder" / "model.safetensors"))
    torch.save({k: v.half() for k, v in state.items()}, folder / "pytorch_model.fp16.bin")
    ours = text_encoder.load_text_encoder(tmp_path, variant="fp16")
    assert ours.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match=r"no weights file \(model\.safetensors or pytorch_model\.bin\)"):
        text_encoder.load_text_encoder(tmp_path)


def test_invalid_config_json_is_named(saved, tmp_path):
    _broken_copy(saved, tmp_path, lambda s: None)
    config = tmp_path / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 64 64'))
    with pytest.raises(ValueError, match=rf"^{config}: invalid JSON \(line \d+ column \d+: Expecting ',' delimiter"):
        text_encoder.load_text_encoder(tmp_path)


def test_with_projection_matches_transformers(tmp_path):
    """SDXL's second encoder: CLIPTextModelWithProjection (chosen from config.json's architectures), its
    projected pooled output and penultimate hidden states, on ids padded with "!" as SDXL's tokenizer_2 pads."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, hidden_act="gelu", projection_dim=24)
    ref = transformers.CLIPTextModelWithProjection(config).eval()
    ref.save_pretrained(tmp_path / "text_encoder_2", safe_serialization=True)
    ours = text_encoder.load_text_encoder(tmp_path, subfolder="text_encoder_2")
    assert type(ours).__name__ == "CLIPTextModelWithProjection"
    tok = loading.default_tokenizer(pad_token="!")
    ids = tok(["a photo of a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids
    assert ids[1, -1] == tok.convert_tokens_to_ids("!") == 0
    with torch.no_grad():
        got, want = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert got.text_embeds.shape == (2, 24)
    for a, b in ((got.text_embeds, want.text_embeds), (got.hidden_states[-2], want.hidden_states[-2])):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
