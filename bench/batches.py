"""Deterministic micro-batches for the model benchmarks, in the loader's exact format (``NeoBatch``).

The model benchmarks do not read shards: the data path is measured on its own (bench/data_path.py),
and a model step must not wait on decoding. These builders make rows of the shapes the loader
makes: plain text rows (one causal document per row, what a Qwen3 sees) and packed multimodal rows
(several caption-like documents per row, each an ``<img>`` block of a token grid followed by its
text, then padding).
"""

from __future__ import annotations

import torch

from pretrain.model.batch import NeoBatch, PackedRow, collate

IMG_START, IMG_CONTEXT, IMG_END = 3, 4, 5  # any ids work: the model reads images from image_ids
FIRST_TEXT_ID = 8
# Token grids (rows, cols) of the images, one LLM token per 32x32 pixels: 128x128 up to 512x384.
GRIDS = ((4, 4), (8, 8), (6, 10), (12, 8), (16, 12), (8, 16))


def text_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> NeoBatch:
    """One text document per row, no padding, every position supervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        t = torch.randint(FIRST_TEXT_ID, vocab, (seq_len,), generator=g)
        out.append(PackedRow(
            tokens=t, labels=torch.cat([t[1:], t.new_zeros(1)]), loss_mask=torch.ones(seq_len, dtype=torch.bool),
            doc_ids=torch.zeros_like(t), image_ids=torch.full_like(t, -1),
            image_grids=torch.zeros(0, 2, dtype=torch.long), patches=None,
        ))
    return collate(out)


def multimodal_batch(rows: int, seq_len: int, vocab: int, patch_dim: int, seed: int = 0,
                     grids: tuple[tuple[int, int], ...] = GRIDS) -> NeoBatch:
    """Packed rows of caption documents: ``<img>`` + gh*gw context tokens + ``</img>`` + 8..40 text
    tokens, as many as fit, then padding (doc id -1). Patches: 4 per image token, N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    out = []
    for _ in range(rows):
        tokens, docs, image_ids, supervised, row_grids = [], [], [], [], []
        doc = 0
        while True:
            gh, gw = grids[rint(0, len(grids))]
            n_text = rint(8, 41)
            body = [IMG_START] + [IMG_CONTEXT] * (gh * gw) + [IMG_END]
            body += torch.randint(FIRST_TEXT_ID, vocab, (n_text,), generator=g).tolist()
            if len(tokens) + len(body) > seq_len:
                break
            tokens += body
            image_ids += [-1] + [len(row_grids)] * (gh * gw) + [-1] * (1 + n_text)
            supervised += [False] * (gh * gw + 2) + [True] * n_text
            docs += [doc] * len(body)
            row_grids.append((gh, gw))
            doc += 1
        if not row_grids:
            raise ValueError(f"seq_len {seq_len} is too short for one image document")
        pad = seq_len - len(tokens)
        t = torch.tensor(tokens + [0] * pad)
        d = torch.tensor(docs + [-1] * pad)
        last_of_doc = torch.cat([d[1:] != d[:-1], torch.tensor([True])])
        n_patches = sum(4 * gh * gw for gh, gw in row_grids)
        out.append(PackedRow(
            tokens=t, labels=torch.cat([t[1:], t.new_zeros(1)]),
            loss_mask=torch.tensor(supervised + [False] * pad)[None].roll(-1, 1)[0] & ~last_of_doc,
            doc_ids=d, image_ids=torch.tensor(image_ids + [-1] * pad),
            image_grids=torch.tensor(row_grids, dtype=torch.long).view(-1, 2),
            patches=torch.randn(n_patches, patch_dim, generator=g),
        ))
    return collate(out)


def counts(batch: NeoBatch) -> tuple[int, int]:
    """(real tokens, image tokens) of a batch: what the trainer counts for tokens/s and FLOPs."""
    return int((batch.doc_ids >= 0).sum()), int((batch.image_ids >= 0).sum())
