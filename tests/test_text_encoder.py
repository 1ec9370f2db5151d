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
