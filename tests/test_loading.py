"""The bundled CLIP tokenizer: offline, and token for token what CLIP's own BPE produces."""
import pytest

import torch

from sdcore import loading

pytest.importorskip("transformers", reason="transformers is a test dependency: `make test` installs it")

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
