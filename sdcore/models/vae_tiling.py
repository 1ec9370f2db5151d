"""Tiled VAE encode and decode, as diffusers' AutoencoderKL does it (``enable_tiling``): the input is cut into
overlapping square tiles of the size the VAE was trained at (config ``sample_size`` pixels, or that over the
VAE's downsampling factor in latents), each tile goes through the encoder or decoder alone, and the seams are
hidden by blending each tile linearly into its upper and left neighbours over the overlap (25% of a tile).

The convolutions then only ever see one tile, so the activations, by far the largest tensors (a 2048² SDXL
decode holds 128-channel maps of 2048² floats, 2 GiB each), stay the size of a tile's whatever the image's
size; only the input and the output grow with the image. Rows are blended as they are produced and only the
previous row is kept, so the tiles held at once are two rows', not the whole image's as in diffusers (same
arithmetic, same result).

Tiling changes the result: each tile's group norms see only its own statistics and its attention only its
own pixels, and the blend is a crossfade of two different answers. tests/test_vae.py bounds the difference."""
from __future__ import annotations

import torch

OVERLAP_FACTOR = 0.25  # diffusers' tile_overlap_factor


def _weights(extent: int, b: torch.Tensor):
    """The crossfade's weights of the old and the new tile, y / extent and 1 - y / extent, each computed in
    float64 and rounded once to the tiles' dtype (as diffusers' Python-float scalars are)."""
    w = torch.arange(extent, dtype=torch.float64, device=b.device) / extent
    return (1 - w).to(b.dtype), w.to(b.dtype)


def blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """``b``'s first ``extent`` rows crossfaded from ``a``'s last ones (weight of b: y / extent), in place."""
    extent = min(a.shape[2], b.shape[2], extent)
    if extent > 0:
        wa, wb = (w[:, None] for w in _weights(extent, b))
        b[:, :, :extent] = a[:, :, -extent:] * wa + b[:, :, :extent] * wb
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """``b``'s first ``extent`` columns crossfaded from ``a``'s last ones (weight of b: x / extent), in place."""
    extent = min(a.shape[3], b.shape[3], extent)
    if extent > 0:
        wa, wb = _weights(extent, b)
        b[:, :, :, :extent] = a[:, :, :, -extent:] * wa + b[:, :, :, :extent] * wb
    return b


def tiled(x: torch.Tensor, fn, tile_in: int, tile_out: int, overlap_factor: float = OVERLAP_FACTOR) -> torch.Tensor:
    """``fn`` applied to overlapping ``tile_in``-square tiles of ``x`` (each giving a ``tile_out``-square tile,
    smaller at the right and bottom edges), blended and stitched: diffusers' tiled_encode / tiled_decode.

    Tiles start every ``tile_in * (1 - overlap)`` input pixels; in the output each tile is blended over
    ``tile_out * overlap`` pixels with the tile above and the one to its left (already blended themselves,
    as diffusers blends in place), then its first ``tile_out - blend`` rows and columns are kept."""
    stride = int(tile_in * (1 - overlap_factor))
    blend = int(tile_out * overlap_factor)
    keep = tile_out - blend
    rows, above = [], None
    for i in range(0, x.shape[2], stride):
        row = []
        for j in range(0, x.shape[3], stride):
            tile = fn(x[:, :, i:i + tile_in, j:j + tile_in])
            if above is not None:
                tile = blend_v(above[len(row)], tile, blend)
            if row:
                tile = blend_h(row[-1], tile, blend)
            row.append(tile)
        rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)
