"""SD's text encoders are transformers' CLIPTextModel (SD 1.x: OpenAI ViT-L/14, SD 2.x: OpenCLIP ViT-H/14 in
HF format). sdcore does not copy CLIP: it registers its attention with transformers' AttentionInterface, so
the causal self-attention of every layer runs through sdcore.ops.attention (and follows use_backend)."""
from __future__ import annotations

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


def load_text_encoder(path, subfolder: str | None = "text_encoder", device=None, dtype=None,
                      variant: str | None = None):
    """A CLIPTextModel from a diffusers-format folder, offline, with its attention on sdcore.ops."""
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(str(path), subfolder=subfolder or "", local_files_only=True,
                                          attn_implementation=register(), torch_dtype=dtype, variant=variant)
    return model.to(device).eval()


def build_text_encoder(config: dict, state: dict | None = None, device=None, dtype=None, source="text encoder"):
    """transformers' CLIPTextModel for a config dict, with sdcore's attention: loaded strictly from ``state``
    (every tensor present, nothing extra, shapes equal; errors name ``source``), or randomly initialized from
    the global RNG when there is none (the embedded default model)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .. import loading

    model = CLIPTextModel._from_config(CLIPTextConfig(**config), attn_implementation=register())
    if state is not None:
        loading.load_weights(model, state, source)
    return model.to(device=device, dtype=dtype).eval()
