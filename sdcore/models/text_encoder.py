"""SD's text encoders are transformers' CLIPTextModel (SD 1.x: OpenAI ViT-L/14, SD 2.x: OpenCLIP ViT-H/14 in
HF format); SDXL adds a CLIPTextModelWithProjection (OpenCLIP bigG/14), whose projected pooled output conditions
its UNet too. sdcore does not copy CLIP: it registers its attention with transformers' AttentionInterface, so
the causal self-attention of every layer runs through sdcore.ops.attention (and follows use_backend)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import _backend, ops

IMPLEMENTATION = "sdcore"


def sdcore_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: q/k/v [B, H, N, D] in, ([B, N, H, D], None) out."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if attention_mask is not None or dropout > 0.0:
        # A padding mask or training-time dropout is more than the fused op expresses: PyTorch's SDPA runs it.
        reason = "an explicit attention mask" if attention_mask is not None else "attention dropout"
        _backend.note_fallback("attention (text encoder)", f"{reason} is not supported by sdcore.ops.attention")
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                               is_causal=causal and mask is None, scale=scaling)
    else:
        out = ops.attention(query, key, value, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers sdcore's attention (and SDPA-style mask creation) with transformers; returns the name to
    pass as attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sdcore_attention_forward)
    # A purely causal mask is skipped (None + is_causal), exactly what the fused op takes.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION


# The config keys that size the network, with the JSON kind each must have (CLIPTextConfig's defaults). Recent
# transformers validate these themselves; older ones would take "768" and fail inside a layer.
_SIZE_KEYS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=512, attention_dropout=0.0)


def text_config(config: dict, source="text encoder config"):
    """transformers' CLIPTextConfig for a config dict; a wrongly typed or refused value is a ValueError naming
    ``source``."""
    from transformers import CLIPTextConfig

    from .. import loading

    loading.check_config_types(config, _SIZE_KEYS, source)
    try:
        return CLIPTextConfig(**config)
    except Exception as exc:  # noqa: BLE001 — transformers' strict-dataclass errors are not ValueErrors
        raise ValueError(f"{source}: {type(exc).__name__}: {exc}") from exc


def load_text_encoder(path, subfolder: str | None = "text_encoder", device=None, dtype=None,
                      variant: str | None = None):
    """A CLIPTextModel (or, where config.json's ``architectures`` says so, as in SDXL's text_encoder_2/, a
    CLIPTextModelWithProjection) from a diffusers-format folder (config.json + model[.variant].safetensors or
    pytorch_model[.variant].bin), offline, with its attention on sdcore.ops. Strict, as the UNet and VAE are:
    transformers' own from_pretrained would fill a missing tensor with random values and carry on."""
    from .. import loading

    folder = Path(path) / subfolder if subfolder else Path(path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing (expected a transformers CLIPTextModel folder)")
    raw = loading.read_json(config_file)
    config = text_config(raw, config_file)
    with_projection = "CLIPTextModelWithProjection" in (raw.get("architectures") or ())
    weights = loading.find_weights(folder, ["model.safetensors", "pytorch_model.bin"], variant)
    return build_text_encoder(config, loading.read_state_dict(weights), device=device, dtype=dtype, source=weights,
                              with_projection=with_projection)


def position_ids(config) -> torch.Tensor:
    """CLIP's position_ids buffer, as CLIPTextEmbeddings makes it: 0..N-1, shaped [1, N]."""
    n = config["max_position_embeddings"] if isinstance(config, dict) else config.max_position_embeddings
    return torch.arange(n).expand((1, -1))


def _model_names(state: dict, model_keys, config) -> dict:
    """A text-encoder state dict under the installed CLIPTextModel's names. transformers 5 dropped the
    "text_model." prefix that files saved by 4.x carry (and older versions want it back). The position_ids a
    file may hold (a persistent buffer in old transformers; rounded floats in some fp16 files) are never used:
    made fresh where the model keeps them in its state dict, rebuilt after loading where it does not."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in model_keys) else ""
    out = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        if bare == "embeddings.position_ids":
            continue
        name = bare if bare in model_keys else prefix + bare  # text_projection sits beside text_model
        out[key if name in out else name] = value  # a name given twice stays as it was: unexpected, and said
    out.update({k: position_ids(config) for k in model_keys if k.endswith(".position_ids")})
    return out


def build_text_encoder(config, state: dict | None = None, device=None, dtype=None, source="text encoder",
                       with_projection: bool = False):
    """transformers' CLIPTextModel (``with_projection``: CLIPTextModelWithProjection, whose first output is the
    pooled embedding projected to projection_dim) for a config (a dict or a CLIPTextConfig), with sdcore's
    attention: loaded
    strictly from ``state`` (every tensor present, nothing extra, shapes and dtypes right; errors name
    ``source``) onto a model built on the meta device, so a failed load leaves nothing half initialized; or
    randomly initialized from the global RNG when there is no state (the embedded default model)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .. import loading

    config = text_config(config, source) if isinstance(config, dict) else config
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    if state is None:
        return cls._from_config(config, attn_implementation=register()).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation=register())
    loading.load_weights(model, _model_names(state, model.state_dict().keys(), config), source)
    # Non-persistent buffers are in no file: load_state_dict leaves them on the meta device.
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{name}: a buffer of {cls.__name__} that sdcore does not know how to rebuild")
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, position_ids(config))
    return model.to(device=device, dtype=dtype).eval()
