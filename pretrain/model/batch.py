"""The packed micro-batch the data path hands to the model: the one contract between them.

Every pipeline stage receives the whole micro-batch (the text-side tensors are small): the first
stage embeds tokens and pixels, every stage derives the native positions and mask from the
metadata, the last stage computes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class NeoBatch:
    tokens: torch.Tensor  # [b, s] long: input token ids, packed documents, padded to s
    labels: torch.Tensor  # [b, s] long: the next token to predict at each position
    loss_mask: torch.Tensor  # [b, s] bool: supervised positions (assistant text, captions)
    doc_ids: torch.Tensor  # [b, s] long: document index within the row; padding is one more, id -1
    image_ids: torch.Tensor  # [b, s] long: index into image_grids for <IMG_CONTEXT>, else -1
    image_grids: torch.Tensor  # [n_images, 2] long: TOKEN grid (rows, cols) per image, in order
    patches: torch.Tensor | None = None  # [sum(4*rows*cols), 3*16*16] normalised pixels, or None
    # True only if the native mask is plain causal attention for every real token (``plain_causal``):
    # the model may then skip building the mask. Decided on the host, so no device sync. False is
    # always correct (the mask is built), hence the default for batches not made by ``collate``.
    causal: bool = False

    @property
    def has_images(self) -> bool:
        return self.image_grids.shape[0] > 0

    def to(self, device: torch.device | str) -> NeoBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return NeoBatch(**{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in moved.items()})


@dataclass
class PackedRow:
    """One packed sequence as the loader builds it; its image ids count from 0 within the row."""

    tokens: torch.Tensor  # [s]
    labels: torch.Tensor  # [s]
    loss_mask: torch.Tensor  # [s] bool
    doc_ids: torch.Tensor  # [s]
    image_ids: torch.Tensor  # [s], -1 or 0..n_images-1
    image_grids: torch.Tensor  # [n_images, 2]
    patches: torch.Tensor | None  # [sum(4*rows*cols), P] or None when the row has no image


def plain_causal(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> bool:
    """Whether the native mask of [b, s] rows equals causal attention for every real token: each
    row is ONE document from position 0, optionally followed by padding (doc id < 0), with no image
    token. Padding tokens would then see the document before them, which changes only outputs at
    padding (never supervised); real tokens see exactly what the mask would let them see."""
    if (image_ids >= 0).any():
        return False
    real = doc_ids >= 0
    one_doc = (doc_ids == doc_ids[:, :1]) | ~real
    padding_last = (real[:, 1:] <= real[:, :-1]).all()  # once padding, padding to the end
    return bool(one_doc.all() and padding_last)


def collate(rows: list[PackedRow]) -> NeoBatch:
    """Stack rows into a micro-batch, renumbering image ids to index the batch's image list."""
    image_ids, offset = [], 0
    for row in rows:
        image_ids.append(torch.where(row.image_ids >= 0, row.image_ids + offset, row.image_ids))
        offset += row.image_grids.shape[0]
    patches = [row.patches for row in rows if row.patches is not None and row.patches.numel()]
    doc_ids, image_ids = torch.stack([r.doc_ids for r in rows]), torch.stack(image_ids)
    return NeoBatch(
        tokens=torch.stack([r.tokens for r in rows]),
        labels=torch.stack([r.labels for r in rows]),
        loss_mask=torch.stack([r.loss_mask for r in rows]),
        doc_ids=doc_ids,
        image_ids=image_ids,
        image_grids=torch.cat([r.image_grids.view(-1, 2) for r in rows]).long(),
        patches=torch.cat(patches) if patches else None,
        causal=plain_causal(doc_ids, image_ids),
    )
