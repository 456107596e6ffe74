"""Deterministic packed rows for model tests: several documents per row, text-only documents,
images of different token grids (incl. 1xN and Nx1), padding."""

from __future__ import annotations

import torch

from pretrain.model.batch import PackedRow

IMG_START, IMG_CONTEXT, IMG_END = 3, 4, 5
GRIDS = [(1, 2), (2, 2), (2, 3), (3, 1), (1, 1)]


def packed_rows(n_rows: int, seq_len: int, vocab: int, seed: int = 0, patch_dim: int = 768,
                images: bool = True) -> list[PackedRow]:
    g = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    rows = []
    for _ in range(n_rows):
        tokens, docs, image_ids, supervised, grids = [], [], [], [], []
        doc = 0
        while True:
            body, body_img, body_sup = [], [], []
            n_text = rint(2, 6)
            body += torch.randint(8, vocab, (n_text,), generator=g).tolist()
            body_img += [-1] * n_text
            body_sup += [False] * n_text
            if images and rint(0, 3) > 0:  # two documents in three carry an image
                gh, gw = GRIDS[rint(0, len(GRIDS))]
                body += [IMG_START] + [IMG_CONTEXT] * (gh * gw) + [IMG_END]
                body_img += [-1] + [len(grids)] * (gh * gw) + [-1]
                body_sup += [False] * (gh * gw + 2)
                grids.append((gh, gw))
            n_answer = rint(2, 6)
            body += torch.randint(8, vocab, (n_answer,), generator=g).tolist()
            body_img += [-1] * n_answer
            body_sup += [True] * n_answer
            if len(tokens) + len(body) > seq_len:
                if any(i >= 0 for i in body_img):
                    grids.pop()
                break
            tokens += body
            image_ids += body_img
            supervised += body_sup
            docs += [doc] * len(body)
            doc += 1
        pad = seq_len - len(tokens)
        tokens += [0] * pad
        docs += [-1] * pad
        image_ids += [-1] * pad
        supervised += [False] * pad
        t = torch.tensor(tokens)
        labels = torch.cat([t[1:], t.new_zeros(1)])
        # The last token of a document predicts nothing inside it.
        d = torch.tensor(docs)
        last_of_doc = torch.cat([d[1:] != d[:-1], torch.tensor([True])])
        n_patches = sum(4 * gh * gw for gh, gw in grids)
        rows.append(PackedRow(
            tokens=t, labels=labels, loss_mask=torch.tensor(supervised) & ~last_of_doc, doc_ids=d,
            image_ids=torch.tensor(image_ids), image_grids=torch.tensor(grids, dtype=torch.long).view(-1, 2),
            patches=torch.randn(n_patches, patch_dim, generator=g) if grids else None,
        ))
    return rows


def text_rows(n_rows: int, seq_len: int, vocab: int, seed: int = 0) -> list[PackedRow]:
    """One plain text document per row, no padding: what a causal LM such as HF Qwen3 sees."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        t = torch.randint(8, vocab, (seq_len,), generator=g)
        rows.append(PackedRow(tokens=t, labels=torch.cat([t[1:], t.new_zeros(1)]),
                              loss_mask=torch.ones(seq_len, dtype=torch.bool), doc_ids=torch.zeros_like(t),
                              image_ids=torch.full_like(t, -1), image_grids=torch.zeros(0, 2, dtype=torch.long),
                              patches=None))
    return rows
