"""NEO's weighted next-token loss: loss = sum(w * ce) / sum(w) with a per-token weight that
depends on how many supervised tokens its sample (packed document) has:
"token" w = 1, "sample" w = 1/n, "square" w = 1/sqrt(n) (the reference's default).

The model returns per-token cross-entropy; the normaliser sum(w) is taken over the whole global
batch by the trainer, so the loss does not depend on how samples fall into micro-batches or
data-parallel ranks (the reference normalises per micro-batch per GPU instead).

n counts supervised *tokens*, as the spec and the reference do (the reference counts a
document's labels before the next-token shift), not supervised *targets*. The two differ by one
for a document whose first token is supervised: nothing in the document predicts that token, so
``loss_mask`` (target side) cannot show it, yet it is one of the document's supervised tokens.
Of the three templates (pretrain/data/template.py) only ``text`` documents start with a
supervised token; their n is their full length (text + ``<|endoftext|>``) while they train on
one target fewer. The first token is counted when ``loss_mask`` holds at the document's first
position: in every template a document's first token is supervised exactly when its second one
is (text: both; caption: ``<img>`` then ``<IMG_CONTEXT>``, neither; conversation:
``<|im_start|>`` then the role header, neither), and ``loss_mask`` at the first position is the
second token's supervision. tests/model/test_loss_weights.py pins this against the templates'
own token-side supervision and the reference's count.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("token", "sample", "square")


def token_weights(loss_mask: torch.Tensor, doc_ids: torch.Tensor, reduction: str = "square") -> torch.Tensor:
    """Float32 [b, s] weights, 0 where unsupervised (module docstring: what n counts)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r} is not one of {REDUCTIONS}")
    mask = loss_mask.float()
    if reduction == "token":
        return mask
    # Supervised tokens per document. Documents are contiguous runs of equal doc_ids in a row:
    # number the runs across the whole batch, count per run, read the count back per token.
    b, s = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = starts.long().cumsum(dim=1) - 1 + torch.arange(b, device=doc_ids.device)[:, None] * s
    # Every supervised target, plus the document's first token where it is supervised.
    counted = mask + mask * starts.float()
    counts = torch.zeros(b * s, device=mask.device).scatter_add_(0, run.flatten(), counted.flatten())
    n = counts[run].clamp(min=1.0)
    scale = 1.0 / n if reduction == "sample" else n.rsqrt()
    return mask * scale
