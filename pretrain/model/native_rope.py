"""Rotary position embeddings of NEO: Native-RoPE for the decoder, 2D RoPE for patches.

Native-RoPE (every decoder layer): the per-head query/key is 2d wide, laid out as
concat(t [d], h [d/2], w [d/2]); each part is rotated on its own with the HF Llama/Qwen
"rotate_half" convention, its own base and its own position (T with ``rope_theta`` over d
channels, H and W with ``rope_theta_hw`` over d/2 channels each). Because rotate_half pairs
channel i with i + m/2 *inside* a part of width m, cos/sin of the three parts can be
concatenated into one 2d-wide table, computed once per micro-batch and reused by every layer;
only the rotate_half step has to know the part boundaries (``apply_native_rope``; the table's
sine carries rotate_half's sign).

2D RoPE (patch embedding): the reference's interleaved convention (pairs are channels 2i and
2i+1), first half of the channels by the patch column, second half by the patch row.

Angles are always formed in float32 (like HF and the reference): bf16 cannot even represent
positions above 256 exactly.
"""

from __future__ import annotations

import functools

import torch


def rope_inv_freq(dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """float32 [dim/2]: 1 / base^(2i/dim), the HF/reference formula."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """float32 [..., dim/2] rotation angles of integer positions."""
    return positions[..., None].float() * rope_inv_freq(dim, base, positions.device)


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) of shape [..., dim] for rotate_half RoPE (emb = cat(freqs, freqs)).

    Kept in float32: ``apply_native_rope`` then rotates in float32 and casts back. HF instead casts
    cos/sin to the activation dtype first; pass ``cos.to(x.dtype)`` to reproduce that exactly.
    """
    freqs = _angles(positions, dim, base)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _native_parts(head_dim: int) -> tuple[int, int, int]:
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for Native-RoPE, got {head_dim}")
    return head_dim, head_dim // 2, head_dim // 2


@functools.cache
def _swap_index(device: torch.device) -> torch.Tensor:
    return torch.tensor([2, 3, 0, 1, 5, 4, 7, 6], device=device)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """rotate_half of each part of x [..., 2d] = concat(t, h, w) without its sign: the two halves of
    every part trade places, one gather over eighths of the width (t is four, h and w two each).
    Its own inverse and its own transpose."""
    return x.unflatten(-1, (8, -1)).index_select(-2, _swap_index(x.device)).flatten(-2)


def native_rope_cos_sin(
    positions_thw: torch.Tensor, head_dim: int, rope_theta: float, rope_theta_hw: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, signed sin) of shape [s, b, 1, 2*head_dim] from positions [3, b, s].

    The [s, b, 1, 2d] layout broadcasts against megatron's [s, b, heads, 2d] queries/keys. The
    sine carries rotate_half's sign: -sin on the first half of each part, +sin on the second, so
    that ``apply_native_rope`` rotates with one gather and no negation (built once per micro-batch,
    used by every layer).
    """
    d_t, d_h, d_w = _native_parts(head_dim)
    parts = [
        rope_cos_sin(positions_thw[0], d_t, rope_theta),
        rope_cos_sin(positions_thw[1], d_h, rope_theta_hw),
        rope_cos_sin(positions_thw[2], d_w, rope_theta_hw),
    ]
    cos = torch.cat([c for c, _ in parts], dim=-1)
    sin = torch.cat([torch.cat([-s[..., : s.shape[-1] // 2], s[..., s.shape[-1] // 2 :]], dim=-1) for _, s in parts],
                    dim=-1)
    return cos.transpose(0, 1).unsqueeze(2), sin.transpose(0, 1).unsqueeze(2)


def apply_native_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate a 2d-wide x = concat(t, h, w) with a ``native_rope_cos_sin`` table (broadcastable).

    rotate_half is applied within each of the three parts, never across the 2d width
    (``swap_halves``; its sign is in the table): bit for bit what cat(-x2, x1) * sin gives.
    """
    _native_parts(head_dim)
    return (x * cos + swap_halves(x) * sin).to(x.dtype)


def native_rope(
    x: torch.Tensor, positions_thw: torch.Tensor, head_dim: int, rope_theta: float, rope_theta_hw: float
) -> torch.Tensor:
    """One-shot Native-RoPE of x [s, b, heads, 2d] at positions [3, b, s] (tests, debugging)."""
    cos, sin = native_rope_cos_sin(positions_thw, head_dim, rope_theta, rope_theta_hw)
    return apply_native_rope(x, cos, sin, head_dim)


def vision_rope_2d(
    features: torch.Tensor, patch_rows: torch.Tensor, patch_cols: torch.Tensor, base: float
) -> torch.Tensor:
    """2D RoPE of patch features [n, C]: channels [:C/2] by column, [C/2:] by row.

    Interleaved pairs (2i, 2i+1) within each half, rotary dim C/2 per half, float32 math,
    result cast back to the features' dtype (as the reference does).
    """
    n, c = features.shape
    if c % 4:
        raise ValueError(f"vision 2D RoPE needs channels divisible by 4, got {c}")
    half = c // 2
    pos = torch.stack([patch_cols, patch_rows], dim=1)  # [n, 2]: half 0 by x, half 1 by y
    angles = _angles(pos, half, base)  # [n, 2, C/4]
    cos, sin = angles.cos(), angles.sin()
    pairs = features.float().reshape(n, 2, c // 4, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.view(n, c).to(features.dtype)
