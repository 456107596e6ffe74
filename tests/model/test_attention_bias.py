"""The native mask reaches attention as an additive bias (0 / -inf), the same attention as the
boolean mask. The model builds it once per micro-batch for all layers (checked in
tests/model/test_causal_path.py): with a boolean mask SDPA builds a new float bias on every call and
autograd keeps each layer's copy until backward, L * s * s per row (20 GiB for neo_2b at 16k in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.model.batch import collate
from pretrain.model.native_attention import core_attention
from pretrain.model.positions import native_attention_bias, native_mask
from tests.model.packed_batches import packed_rows

SEQ, VOCAB = 48, 256


def test_bias_is_the_boolean_mask():
    batch = collate(packed_rows(2, SEQ, VOCAB, seed=4))
    assert not batch.causal
    masked = native_mask(batch.doc_ids, batch.image_ids)
    bias = native_attention_bias(batch.doc_ids, batch.image_ids, torch.float32)
    assert bias.shape == masked.shape and bias.dtype == torch.float32
    assert torch.equal(bias == float("-inf"), masked) and torch.equal(bias[~masked], torch.zeros(int((~masked).sum())))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ, 2, 4, 32, generator=g)
    k = torch.randn(SEQ, 2, 2, 32, generator=g)
    v = torch.randn(SEQ, 2, 2, 16, generator=g)
    got = core_attention(q, k, v, bias, 0.25)
    heads = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731 - [s, b, n, d] -> [b, n, s, d]
    expected = F.scaled_dot_product_attention(  # the boolean mask, unfused, V at its own width
        heads(q), heads(k).repeat_interleave(2, 1), heads(v).repeat_interleave(2, 1), attn_mask=~masked, scale=0.25)
    torch.testing.assert_close(got, expected.permute(2, 0, 1, 3).reshape(SEQ, 2, -1), rtol=1e-5, atol=1e-6)
