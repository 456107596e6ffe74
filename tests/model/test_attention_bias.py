"""The native mask reaches attention as one additive bias per micro-batch, shared by every layer.

With a boolean mask SDPA builds a new float bias on every call and autograd keeps each layer's
copy until backward: activation memory of L * s * s per row (20 GiB for neo_2b at 16k in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.distributed import spawn
from pretrain.model.batch import collate
from pretrain.model.config import NeoModelConfig
from pretrain.model.native_attention import core_attention
from pretrain.model.positions import native_attention_bias, native_mask
from tests.model.packed_batches import packed_rows

NEO = NeoModelConfig(hidden_size=64, pre_buffer_layers=2, post_llm_layers=2, num_attention_heads=4, num_kv_heads=2,
                     head_dim=16, ffn_hidden_size=96, vocab_size=256, vision_hidden_size=32)
SEQ = 48


def test_bias_is_the_boolean_mask():
    batch = collate(packed_rows(2, SEQ, NEO.vocab_size, seed=4))
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
    expected = F.scaled_dot_product_attention(  # the boolean mask, unfused, V at its own width
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3).repeat_interleave(2, 1), v.permute(1, 2, 0, 3).repeat_interleave(2, 1),
        attn_mask=~masked, scale=0.25)
    torch.testing.assert_close(got, expected.permute(2, 0, 1, 3).reshape(SEQ, 2, -1), rtol=1e-5, atol=1e-6)


def _saved_masks() -> list[tuple[int, torch.dtype]]:
    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.schedule import forward_backward

    batch = collate(packed_rows(2, SEQ, NEO.vocab_size, seed=4))
    saved = []

    def pack(t):
        if t.shape == (2, 1, SEQ, SEQ):
            saved.append((t.untyped_storage().data_ptr(), t.dtype))
        return t

    with runtime.model_parallel(1, 1, seed=3):
        model = NeoModel(transformer_config(NEO), NEO)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_backward(model, [batch])
    return saved


def test_one_bias_serves_every_layer():
    saved = spawn.run(_saved_masks, 1, timeout=300)[0]
    assert len(saved) == NEO.num_layers, saved  # each layer's attention keeps the mask for backward...
    assert len({ptr for ptr, _ in saved}) == 1, saved  # ...and it is one tensor, not one copy per layer
    assert {dtype for _, dtype in saved} == {torch.float32}
