"""What the benchmarks share: timing (CUDA events on a GPU after a synchronize, the host clock on the CPU;
warm-up runs first; the median of the timed runs) and the inputs of one UNet call."""
from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, device: str, repeat: int, warmup: int = 2) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def unet_inputs(cfg, latent: int, pixels: int, device, dtype, generator=None):
    """Random inputs of one CFG-batch-2 UNet call at ``latent``² for a UNet ``cfg``: the sample, the text
    states, and the keyword arguments (SDXL: the pooled text and 6 time ids for a ``pixels``² image)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * 2, device=device, dtype=dtype)}
    return x, text, extra
