"""Packing encoded documents into rows of exactly ``seq_len`` tokens.

Selection is first-fit decreasing over a buffer of documents: take them longest first and put
each into the first row that still has room, opening a new row when none has. Every document
of the buffer lands in exactly one row (Energon silently drops whatever a selector leaves out,
so the selector here never leaves anything out). Documents longer than ``seq_len`` never reach
it: the task encoder turns them into zero-length "skipped" records that ride along with a row
so they are counted, never truncated (a cut would break an image block or a turn).

A row is its documents in buffer order, then padding up to ``seq_len``: pad token, label = pad
token, ``loss_mask`` False, ``doc_ids`` -1 (padding is one more document of its own), no image.
Document ids are 0, 1, 2, ... in row order, so neighbouring documents always differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.model.batch import PackedRow

PAD_DOC_ID = -1


@dataclass
class Document:
    """One encoded sample, ready to pack (arrays of equal length n, images decoded)."""

    key: str
    tokens: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64, next token inside the document; pad id at its last token
    loss_mask: np.ndarray  # [n] bool
    image_ids: np.ndarray  # [n] int64, -1 or 0..k-1 (image index within the document)
    image_grids: np.ndarray  # [k, 2] int64 token grids
    patches: torch.Tensor | None  # [sum 4*gh*gw, 768] float32, None without images

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``.

    Every index is in exactly one bin; inside a bin indices ascend; bins are ordered by their
    first index. Deterministic (ties broken by index). Raises if an item exceeds ``capacity``.
    """
    n = len(lengths)
    lens = np.asarray(lengths, dtype=np.int64).reshape(n)
    if n and (lens.max() > capacity or lens.min() < 0):
        raise ValueError(f"item of length {int(lens.max())} does not fit a bin of {capacity}")
    order = np.lexsort((np.arange(n), -lens))  # longest first, then by index
    remaining = np.empty(n, dtype=np.int64)
    bins: list[list[int]] = []
    for i in order.tolist():
        length = lens[i]
        fits = np.flatnonzero(remaining[: len(bins)] >= length)
        if fits.size:
            b = int(fits[0])
            bins[b].append(i)
            remaining[b] -= length
        else:
            remaining[len(bins)] = capacity - length
            bins.append([i])
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def build_row(documents: Sequence[Document], seq_len: int, pad_id: int) -> PackedRow:
    """Concatenate documents and pad to ``seq_len``: one ``PackedRow`` (vectorised, no token loop)."""
    used = sum(len(d) for d in documents)
    if used > seq_len:
        raise ValueError(f"documents of {used} tokens do not fit a row of {seq_len}")
    pad = seq_len - used
    tokens = [d.tokens for d in documents] + [np.full(pad, pad_id, dtype=np.int64)]
    labels = [d.labels for d in documents] + [np.full(pad, pad_id, dtype=np.int64)]
    loss_mask = [d.loss_mask for d in documents] + [np.zeros(pad, dtype=bool)]
    doc_ids = [np.full(len(d), i, dtype=np.int64) for i, d in enumerate(documents)]
    doc_ids.append(np.full(pad, PAD_DOC_ID, dtype=np.int64))
    image_ids, grids, offset = [], [], 0
    for d in documents:
        ids = d.image_ids
        image_ids.append(np.where(ids >= 0, ids + offset, ids) if offset else ids)
        grids.append(d.image_grids.reshape(-1, 2))
        offset += d.image_grids.shape[0]
    image_ids.append(np.full(pad, -1, dtype=np.int64))
    patches = [d.patches for d in documents if d.patches is not None and d.patches.numel()]
    grid_array = np.concatenate(grids) if grids else np.zeros((0, 2), dtype=np.int64)
    return PackedRow(
        tokens=torch.from_numpy(np.concatenate(tokens)),
        labels=torch.from_numpy(np.concatenate(labels)),
        loss_mask=torch.from_numpy(np.concatenate(loss_mask)),
        doc_ids=torch.from_numpy(np.concatenate(doc_ids)),
        image_ids=torch.from_numpy(np.concatenate(image_ids)),
        image_grids=torch.from_numpy(np.ascontiguousarray(grid_array, dtype=np.int64)),
        patches=torch.cat(patches) if patches else None,
    )
