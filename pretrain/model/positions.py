"""Native (T, H, W) positions and the native attention mask of a packed micro-batch.

Both are pure functions of the token layout, computed once per micro-batch and shared by
every decoder layer. Inputs are [b, s] rows of packed documents:

- ``doc_ids``: the document of each token. A document is a contiguous run of equal ids;
  padding carries its own id (e.g. -1) and is just one more document.
- ``image_ids``: for ``<IMG_CONTEXT>`` tokens the index of their image in ``image_grids``,
  -1 elsewhere. The context tokens of one image are contiguous.
- ``image_grids``: [n_images, 2] token grid (gh, gw) of each image (one token per 32x32 px).

Everything is vectorised (no loop over tokens or images, no host synchronisation), so it
runs unchanged on CPU and CUDA.
"""

from __future__ import annotations

import torch


def _document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """True where a new document begins (first column, or the id changes)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def _segmented_cumsum(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Inclusive cumsum along dim 1 that restarts at every True of ``starts``."""
    total = values.cumsum(dim=1)
    before = total - values  # running sum just before each position
    cols = torch.arange(values.shape[1], device=values.device).expand_as(values)
    start_col = torch.where(starts, cols, torch.zeros_like(cols)).cummax(dim=1).values
    return total - before.gather(1, start_col)


def native_positions(doc_ids: torch.Tensor, image_ids: torch.Tensor, image_grids: torch.Tensor) -> torch.Tensor:
    """LongTensor[3, b, s] of (T, H, W) per token, from the layout metadata alone.

    T restarts at 0 in each document and follows the reference's
    ``t = cumsum(shifted_is_img_start + is_not_img_context) - 1``: a whole image costs one
    step of T. Every image block is ``<img>``, its context tokens, ``</img>``, so "the token
    after ``<img>``" is exactly "the first context token of an image": both terms come from
    ``image_ids`` and the model needs no token ids (the tests check this against the formula
    on token ids). H/W are the row/column of a context token in its image's token grid
    (row-major), 0 for every other token.
    """
    starts = _document_starts(doc_ids)
    is_ctx = image_ids >= 0
    first_ctx = is_ctx.clone()
    first_ctx[:, 1:] &= image_ids[:, 1:] != image_ids[:, :-1]
    step = first_ctx.long().masked_fill(starts, 0) + (~is_ctx).long()
    t = _segmented_cumsum(step, starts) - 1

    h = torch.zeros_like(t)
    w = torch.zeros_like(t)
    n_images = image_grids.shape[0]
    if n_images > 0:  # a shape test, not a data-dependent branch
        flat_ids = image_ids.reshape(-1)
        is_ctx = flat_ids >= 0
        image = flat_ids.clamp(min=0)
        idx = torch.arange(flat_ids.numel(), device=flat_ids.device)
        # Rank of a context token inside its image = its flat index minus the image's first.
        none = flat_ids.numel()
        first = torch.full((n_images,), none, dtype=idx.dtype, device=idx.device)
        first = first.scatter_reduce(0, image, torch.where(is_ctx, idx, none), "amin")
        rank = idx - first[image]
        grid_w = image_grids[:, 1].to(idx.device, idx.dtype)[image]
        h = torch.where(is_ctx, rank // grid_w, 0).view_as(t)
        w = torch.where(is_ctx, rank % grid_w, 0).view_as(t)
    return torch.stack([t, h, w])


def native_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """BoolTensor[b, 1, s, s], True = MASKED (megatron's convention for ``attention_mask``).

    Query q may attend key k iff they are in the same document AND (k <= q OR both are
    context tokens of the same image): causal text, bidirectional images, isolated documents.
    """
    s = doc_ids.shape[1]
    pos = torch.arange(s, device=doc_ids.device)
    causal = pos[None, :] <= pos[:, None]  # [q, k]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids >= 0)[:, None, :]
    allowed = same_doc & (causal | same_image)
    return ~allowed[:, None]


def native_attention_bias(doc_ids: torch.Tensor, image_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The native mask as a dense additive bias: [b, 1, s, s] in ``dtype``, 0 where allowed, -inf
    where masked (every token sees itself, so no row is all -inf).

    The reference that the model's mask-following attention (``masked_attention.NativeMask``) is
    checked against, and the baseline the benchmarks compare it with: a kernel fed this bias
    computes all s*s pairs, most of which a packed row masks.
    """
    masked = native_mask(doc_ids, image_ids)
    return torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill_(masked, float("-inf"))
