"""NEO's loss weights against the spec's definition, sample by sample."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model.loss import token_weights
from tests.model.packed_batches import packed_rows


def _brute(loss_mask, doc_ids, reduction):
    w = torch.zeros(loss_mask.shape)
    for b in range(loss_mask.shape[0]):
        for i in range(loss_mask.shape[1]):
            if not loss_mask[b, i]:
                continue
            n = sum(1 for j in range(loss_mask.shape[1]) if doc_ids[b, j] == doc_ids[b, i] and loss_mask[b, j])
            w[b, i] = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]
    return w


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_token_weights_match_definition(reduction):
    rows = packed_rows(3, 40, 100, seed=1)
    mask = torch.stack([r.loss_mask for r in rows])
    docs = torch.stack([r.doc_ids for r in rows])
    assert mask.any()
    torch.testing.assert_close(token_weights(mask, docs, reduction), _brute(mask, docs, reduction), rtol=1e-6, atol=0)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        token_weights(torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.long), "mean")
