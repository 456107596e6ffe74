"""The causal fast path: a micro-batch of plain text rows (one document from position 0, then
padding) runs attention with ``is_causal`` and no mask (``NeoBatch.causal``). Padding then sees the
text before it, which may only change outputs at padding: the loss and every gradient must equal
those of the masked path, at TP1PP1 and on both stages of PP2 (each stage decides on its own).
The masked path builds one ``NativeMask`` per micro-batch that all layers share, and keeps no s*s
tensor for backward."""

from __future__ import annotations

import dataclasses
import types

import torch

from pretrain.distributed import spawn
from pretrain.model.batch import PackedRow, collate, plain_causal
from pretrain.model.config import NeoModelConfig
from tests.model.packed_batches import packed_rows

NEO = NeoModelConfig(hidden_size=64, pre_buffer_layers=1, post_llm_layers=1, num_attention_heads=4, num_kv_heads=2,
                     head_dim=16, ffn_hidden_size=96, vocab_size=256, vision_hidden_size=32)
SEQ = 40


def _text_row(n_real: int, seed: int) -> PackedRow:
    g = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.randint(8, 256, (n_real,), generator=g), torch.zeros(SEQ - n_real, dtype=torch.long)])
    real = torch.arange(SEQ) < n_real
    return PackedRow(tokens=t, labels=torch.cat([t[1:], t.new_zeros(1)]), loss_mask=real & (torch.arange(SEQ) < n_real - 1),
                     doc_ids=torch.where(real, 0, -1), image_ids=torch.full((SEQ,), -1),
                     image_grids=torch.zeros(0, 2, dtype=torch.long), patches=None)


def test_plain_causal_decision():
    assert collate([_text_row(SEQ, 0), _text_row(25, 1)]).causal  # trailing padding is fine
    assert collate([_text_row(0, 2)]).causal  # an all-padding row has no output that matters
    assert not collate(packed_rows(1, SEQ, 256, seed=3, images=False)).causal  # several documents
    assert not collate(packed_rows(1, SEQ, 256, seed=3)).causal  # images are bidirectional
    docs = torch.tensor([[-1, -1, 0, 0, 0]])  # padding first: the text must not see it
    assert not plain_causal(docs, torch.full_like(docs, -1))
    docs = torch.tensor([[0, 0, -1, 0, 0]])  # text after padding
    assert not plain_causal(docs, torch.full_like(docs, -1))
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    assert not plain_causal(docs, torch.full_like(docs, -1))
    docs = torch.tensor([[3, 3, 3, -1, -1]])
    assert plain_causal(docs, torch.full_like(docs, -1))


def _body(layouts):
    from megatron.core import parallel_state as ps

    import pretrain.model.neo as neo_module
    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.schedule import forward_backward

    batches = [collate([_text_row(SEQ, 10), _text_row(23, 11)]), collate([_text_row(31, 12), _text_row(7, 13)])]
    assert all(b.causal for b in batches)
    masked = [dataclasses.replace(b, causal=False) for b in batches]
    out = {}
    for tp, pp in layouts:
        with runtime.model_parallel(tp, pp, seed=5):
            model = NeoModel(transformer_config(NEO, tp=tp, pp=pp), NEO)
            runs = {}
            for name, micro in (("masked", masked), ("causal", batches)):
                mask_class, builds = neo_module.NativeMask, []

                def build(doc_ids, image_ids, name=name, builds=builds, mask_class=mask_class):
                    assert name == "masked", "the causal fast path built a mask"
                    builds.append(doc_ids.shape)
                    return mask_class.build(doc_ids, image_ids)

                neo_module.NativeMask = types.SimpleNamespace(build=build)
                squares = []  # any s*s tensor attention would keep for backward
                keep = lambda t: (squares.append(t.shape) if t.shape[-2:] == (SEQ, SEQ) else None) or t  # noqa: E731
                try:
                    model.zero_grad(set_to_none=True)
                    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                        loss = forward_backward(model, micro)
                finally:
                    neo_module.NativeMask = mask_class
                kept = (len(builds), len(squares))
                runs[name] = (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                              kept)
            out[(tp, pp)] = (ps.get_pipeline_model_parallel_rank(), runs)
    return out


def _check(results):
    for (stage, runs) in results:
        (loss_m, grads_m, kept_m), (loss_c, grads_c, kept_c) = runs["masked"], runs["causal"]
        # The masked path: one mask per micro-batch (2) for all layers, no s*s tensor kept; the causal
        # path builds none.
        assert kept_m == (2, 0), (stage, kept_m)
        assert kept_c == (0, 0), (stage, kept_c)
        assert (loss_m is None) == (loss_c is None)
        if loss_m is not None:
            assert abs(loss_m - loss_c) <= 1e-6 * abs(loss_m), (stage, loss_m, loss_c)
        assert grads_m.keys() == grads_c.keys() and grads_m
        for name, g in grads_m.items():
            err = (g - grads_c[name]).abs().max().item()
            assert err <= 1e-5 * g.abs().max().item() + 1e-9, (stage, name, err)


def test_same_loss_and_gradients_as_the_mask():
    one = spawn.run(_body, 1, args=([(1, 1)],), timeout=300)
    _check([r[(1, 1)] for r in one])
    two = spawn.run(_body, 2, args=([(1, 2)],), timeout=300)
    assert sorted(r[(1, 2)][0] for r in two) == [0, 1]
    _check([r[(1, 2)] for r in two])
