"""Mask-following attention (pretrain/model/masked_attention.py) against the dense reference: SDPA
with positions.native_attention_bias, V at its own width, computed in float64.

Rows cover an image first and last in a document, two images in one document, back-to-back
images, text-only documents, padding, a document longer than half the row, one-token documents;
GQA (4 query heads on 2 KV heads) and MHA; the default causal block and a tiny one that turns
every text run into a staircase. Errors are relative: max |ours - reference| / max |reference|
over the compared entries. Padding attends to itself only (the module docstring says why): real
tokens are compared to the dense rule, padding outputs must equal their value, and gradients are
taken with no gradient at padding outputs (they are never supervised), where both rules agree.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import masked_attention as ma
from pretrain.model.masked_attention import NativeMask, allowed_pairs, masked_attention, native_rule
from pretrain.model.positions import native_attention_bias, native_mask
from tests.model.packed_batches import packed_rows

TOL = 1e-5
# Documents as segments: ("t", n) text tokens, ("i", n) context tokens of one image; then padding.
ROWS = [
    # image first and last in a document (and two images in it); back-to-back images between text;
    # two one-token documents; a text-only document; a padding tail.
    ([[("i", 5), ("t", 3), ("i", 4)], [("t", 2), ("i", 3), ("i", 4), ("t", 2)], [("t", 1)], [("t", 1)],
      [("t", 6)]], 17),
    # a document longer than half the row (long text after its image); a one-token document; a
    # document that starts with an image; a text-only document; no padding.
    ([[("t", 4), ("i", 9), ("t", 14)], [("t", 1)], [("i", 6), ("t", 3)], [("t", 11)]], 0),
]
SEQ = 48


def layout(rows=ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids, image_ids [len(rows), SEQ]; image ids count over the whole batch (as ``collate``)."""
    docs, images, image = [], [], 0
    for documents, padding in rows:
        d, i = [], []
        for n_doc, segments in enumerate(documents):
            for kind, n in segments:
                d += [n_doc] * n
                i += [image] * n if kind == "i" else [-1] * n
                image += kind == "i"
        d += [-1] * padding
        i += [-1] * padding
        assert len(d) == SEQ, len(d)
        docs.append(d)
        images.append(i)
    return torch.tensor(docs), torch.tensor(images)


def qkv(b: int, nq: int, nkv: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, b, nq, 2 * d, generator=g, dtype=dtype)
    k = torch.randn(SEQ, b, nkv, 2 * d, generator=g, dtype=dtype)
    v = torch.randn(SEQ, b, nkv, d, generator=g, dtype=dtype)
    return q, k, v


def dense_reference(q, k, v, doc_ids, image_ids, scale):
    """softmax(q k^T * scale + native_attention_bias) v, GQA by repetition, float64."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    heads = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731 - [s, b, n, D] -> [b, n, s, D]
    out = F.scaled_dot_product_attention(
        heads(q), heads(k).repeat_interleave(group, 1), heads(v).repeat_interleave(group, 1),
        attn_mask=native_attention_bias(doc_ids, image_ids, torch.float64), scale=scale)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("causal_block", [ma.CAUSAL_BLOCK, 5], ids=["default-block", "staircase"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_cpu_path_matches_dense_reference(heads, causal_block, monkeypatch):
    monkeypatch.setattr(ma, "CAUSAL_BLOCK", causal_block)
    doc_ids, image_ids = layout()
    b, nq, nkv, d = doc_ids.shape[0], *heads, 16
    q, k, v = (t.requires_grad_() for t in qkv(b, nq, nkv, d))
    scale = d**-0.5
    mask = NativeMask.build(doc_ids, image_ids)
    if causal_block == 5:  # the long text runs really became staircases (several pieces per range)
        assert max(len(pieces) for row in mask.plan for _, _, pieces in row) >= 2
    out = masked_attention(q, k, v, mask, scale)
    ref = dense_reference(q, k, v, doc_ids, image_ids, scale)
    real = (doc_ids >= 0).t()  # [s, b]
    assert out.shape == (SEQ, b, nq * d) and out.dtype == torch.float32
    assert rel_err(out[real], ref[real]) <= TOL

    # Padding: finite, and its own value (itself only).
    pad = ~real
    own_v = v.detach().repeat_interleave(nq // nkv, dim=2).reshape(SEQ, b, nq * d)
    assert torch.equal(out.detach()[pad], own_v[pad])

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * real[..., None]
    reference = grads(ref, (q, k, v), grad_out.double())
    for name, ours, theirs in zip("qkv", grads(out, (q, k, v), grad_out), reference):
        assert torch.isfinite(ours).all(), name
        assert rel_err(ours, theirs) <= TOL, name


def test_document_id_that_recurs(monkeypatch):
    """A document id that comes back after another document (not what the packer makes, but what
    the mask defines: same id, same document) and padding in the middle: query ranges that combine
    three pieces (an earlier stretch, the keys before in this stretch, the diagonal)."""
    monkeypatch.setattr(ma, "CAUSAL_BLOCK", 2)
    doc_ids = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0, -1, 2, 2, 2, -1]])
    image_ids = torch.tensor([[-1, 5, -1, -1, 6, 6, -1, -1, -1, -1, -1, -1, -1, -1]])
    mask = NativeMask.build(doc_ids, image_ids)
    assert max(len(pieces) for _, _, pieces in mask.plan[0]) == 3
    g = torch.Generator().manual_seed(0)
    s = doc_ids.shape[1]
    q, k, v = (torch.randn(s, 1, n, w, generator=g, requires_grad=True) for n, w in ((4, 16), (2, 16), (2, 8)))
    out, ref = masked_attention(q, k, v, mask, 0.3), dense_reference(q, k, v, doc_ids, image_ids, 0.3)
    real = (doc_ids >= 0).t()
    assert rel_err(out[real], ref[real]) <= TOL
    grad_out = torch.randn(out.shape, generator=g) * real[..., None]
    for ours, theirs in zip(grads(out, (q, k, v), grad_out), grads(ref, (q, k, v), grad_out.double())):
        assert rel_err(ours, theirs) <= TOL


def test_v_given_padded_to_2d():
    """NativeQKV hands v zero-padded to 2d today: the same output, the same gradient in the first d
    channels and zero in the padding (whatever the padding holds never reaches a result)."""
    doc_ids, image_ids = layout()
    q, k, v = qkv(2, 4, 2, 16)
    mask = NativeMask.build(doc_ids, image_ids)
    v = v.requires_grad_()
    v_padded = F.pad(v.detach(), (0, 16)).requires_grad_()
    out = masked_attention(q, k, v, mask, 0.25)
    out_padded = masked_attention(q, k, v_padded, mask, 0.25)
    torch.testing.assert_close(out_padded, out, rtol=0, atol=0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (g,), (g_padded,) = grads(out, (v,), grad_out), grads(out_padded, (v_padded,), grad_out)
    torch.testing.assert_close(g_padded[..., :16], g, rtol=0, atol=0)
    assert torch.equal(g_padded[..., 16:], torch.zeros_like(g))
    garbage = v_padded.detach().clone()
    garbage[..., 16:] = 1e3
    torch.testing.assert_close(masked_attention(q, k, garbage, mask, 0.25), out, rtol=0, atol=0)


def _covered(plan, s: int) -> torch.Tensor:
    """[s, s] int: how many times the plan hands each (query, key) pair to the kernel (causal
    squares counted as their lower triangle), itself-only ranges as their diagonal."""
    cover = torch.zeros(s, s, dtype=torch.long)
    for q_lo, q_hi, pieces in plan:
        if not pieces:
            idx = torch.arange(q_lo, q_hi)
            cover[idx, idx] += 1
        for k_lo, k_hi, causal in pieces:
            block = torch.ones(q_hi - q_lo, k_hi - k_lo, dtype=torch.long)
            if causal:
                assert q_hi - q_lo == k_hi - k_lo <= ma.CAUSAL_BLOCK  # top-left aligned squares only
                block = block.tril()
            cover[q_lo:q_hi, k_lo:k_hi] += block
    return cover


@pytest.mark.parametrize("causal_block", [ma.CAUSAL_BLOCK, 3], ids=["default-block", "staircase"])
def test_plan_covers_each_allowed_pair_once(causal_block, monkeypatch):
    """On many packed rows (and ROWS, and a document whose id recurs after another one): the kernel
    calls cover every allowed pair exactly once and nothing else; ranges tile the row in order."""
    monkeypatch.setattr(ma, "CAUSAL_BLOCK", causal_block)
    rows = [r for seed in range(12) for r in packed_rows(1, 40 + 7 * seed, 256, seed=seed)]
    layouts = [(r.doc_ids[None], r.image_ids[None]) for r in rows] + [layout()]
    recurring = (torch.tensor([[0, 0, 1, 1, 0, 0, 0, -1, 2, -1]]),
                 torch.tensor([[-1, 5, -1, -1, 6, 6, -1, -1, -1, -1]]))
    for doc_ids, image_ids in layouts + [recurring]:
        mask = NativeMask.build(doc_ids, image_ids)
        s = doc_ids.shape[1]
        pos = torch.arange(s)
        for r, plan in enumerate(mask.plan):
            assert [lo for lo, _, _ in plan] == [0] + [hi for _, hi, _ in plan[:-1]] and plan[-1][1] == s
            d, i = doc_ids[r], image_ids[r]
            rule = native_rule(d[:, None], d[None, :], i[:, None], i[None, :], pos[:, None], pos[None, :])
            assert torch.equal(_covered(plan, s), rule.long())
            real = d >= 0  # on real tokens the rule is positions.native_mask's
            assert torch.equal(rule[real][:, real], ~native_mask(d[None], i[None])[0, 0][real][:, real])


def test_non_contiguous_image_is_refused():
    doc_ids = torch.zeros(1, 8, dtype=torch.long)
    image_ids = torch.tensor([[-1, 0, 0, -1, 0, -1, -1, -1]])
    with pytest.raises(ValueError, match="image 0 are not contiguous"):
        NativeMask.build(doc_ids, image_ids)


def test_allowed_pairs_counts_the_mask():
    for seed in range(6):
        rows = packed_rows(3, 64, 256, seed=seed)
        doc_ids = torch.stack([r.doc_ids for r in rows])
        image_ids = torch.stack([r.image_ids for r in rows])
        real = doc_ids >= 0
        allowed = ~native_mask(doc_ids, image_ids)[:, 0] & real[:, :, None] & real[:, None, :]
        assert torch.equal(allowed_pairs(doc_ids, image_ids), allowed.sum((1, 2)))
        assert NativeMask.build(doc_ids, image_ids).allowed_pairs() == int(allowed.sum())


def test_executed_flops_follow_the_plan():
    """FlopCounterMode (taught the fused CPU kernel) counts exactly the plan's rectangles, V at 2d;
    on a caption row with images the plan hands the kernel at most 1.1x the allowed pairs (the waste:
    the upper half of each causal square of caption text, computed in full)."""
    from torch.utils.flop_counter import FlopCounterMode

    ma.register_cpu_attention_flops()
    s, nq, nkv, d = 512, 4, 2, 16
    doc_ids, image_ids = torch.full((1, s), -1), torch.full((1, s), -1)
    pos = image = 0
    for n_doc, (pre, n_img, post) in enumerate([(5, 150, 30), (3, 64, 60), (4, 100, 40)]):
        doc_ids[0, pos : pos + pre + n_img + post] = n_doc
        image_ids[0, pos + pre : pos + pre + n_img] = image
        pos, image = pos + pre + n_img + post, image + 1
    mask = NativeMask.build(doc_ids, image_ids)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 1, nq, 2 * d, generator=g, requires_grad=True)
    k = torch.randn(s, 1, nkv, 2 * d, generator=g, requires_grad=True)
    v = torch.randn(s, 1, nkv, d, generator=g, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out = masked_attention(q, k, v, mask, d**-0.5)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    executed = mask.executed_pairs()
    assert forward.get_total_flops() == executed * nq * 2 * (2 * d + 2 * d)  # QK^T and PV, V padded to 2d
    assert backward.get_total_flops() == executed * nq * 2 * 5 * (2 * d)
    assert mask.allowed_pairs() <= executed <= 1.1 * mask.allowed_pairs()


def test_bf16_runs_close_to_reference():
    doc_ids, image_ids = layout()
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in qkv(2, 4, 2, 16))
    out = masked_attention(q, k, v, NativeMask.build(doc_ids, image_ids), 0.25)
    assert out.dtype == torch.bfloat16
    real = (doc_ids >= 0).t()
    assert rel_err(out[real], dense_reference(q, k, v, doc_ids, image_ids, 0.25)[real]) < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_selective_recompute_gives_the_same_gradients():
    """Under torch's non-reentrant checkpoint (selective recompute) the mask object passes through."""
    from torch.utils.checkpoint import checkpoint

    doc_ids, image_ids = layout()
    mask = NativeMask.build(doc_ids, image_ids)
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 16))
    grad_out = torch.randn(SEQ, 2, 64, generator=torch.Generator().manual_seed(3))
    plain = grads(masked_attention(q, k, v, mask, 0.25), (q, k, v), grad_out)
    out = checkpoint(masked_attention, q, k, v, mask, 0.25, use_reentrant=False)
    recomputed = grads(out, (q, k, v), grad_out)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mask_misuse_is_refused():
    doc_ids, image_ids = layout()
    mask = NativeMask.build(doc_ids, image_ids)
    q, k, v = qkv(2, 4, 2, 16)
    with pytest.raises(ValueError, match="mask is for"):
        masked_attention(q[:40], k[:40], v[:40], mask, 0.25)
    with pytest.raises(ValueError, match="head dim"):
        masked_attention(q, k, v[..., :8], mask, 0.25)
    with pytest.raises(ValueError, match="no BlockMask"):
        ma.flex_masked_attention(q, k, v, mask, 0.25)


# ----------------------------------------------------------------------------------- FlexAttention


def test_flex_forward_matches_dense_reference_on_cpu():
    """The CUDA path's BlockMask and mask_mod, checked on CPU with torch's eager FlexAttention
    (forward only: torch 2.13 has no FlexAttention backward on CPU). V at d, GQA."""
    from torch.nn.attention.flex_attention import flex_attention

    doc_ids, image_ids = layout()
    mask = NativeMask(doc_ids, image_ids, block_mask=ma.flex_block_mask(doc_ids, image_ids, compile=False))
    q, k, v = qkv(2, 4, 2, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile")  # eager is the point here
        out = ma.flex_masked_attention(q, k, v, mask, 0.25, flex=flex_attention)
    ref = dense_reference(q, k, v, doc_ids, image_ids, 0.25)
    real = (doc_ids >= 0).t()
    assert rel_err(out[real], ref[real]) <= TOL
    own_v = v.repeat_interleave(2, dim=2).reshape(SEQ, 2, -1)
    torch.testing.assert_close(out[~real], own_v[~real], rtol=TOL, atol=1e-6)


@pytest.mark.slow
def test_compiled_flex_forward_on_cpu():
    """What CUDA runs, compiled (torch.compile'd create_block_mask and FlexAttention, no eager
    fallback allowed), here with inductor's CPU code instead of Triton: forward only, two layouts
    through the same compiled functions (a new micro-batch must not need a new mask kernel). About
    12 s of compiling on 2 cores, hence slow."""
    q, k, v = qkv(2, 4, 2, 16)
    doc_ids, image_ids = layout()
    for doc_ids, image_ids in ((doc_ids, image_ids), (doc_ids.flip(1), image_ids.flip(1))):
        block_mask = ma.flex_block_mask(doc_ids, image_ids, compile=True)
        eager = ma.flex_block_mask(doc_ids, image_ids, compile=False)
        assert torch.equal(block_mask.to_dense(), eager.to_dense())
        mask = NativeMask(doc_ids, image_ids, block_mask=block_mask)
        with torch.no_grad():
            out = ma.flex_masked_attention(q, k, v, mask, 0.25, flex=ma._compiled_flex())
        real = (doc_ids >= 0).t()
        assert rel_err(out[real], dense_reference(q, k, v, doc_ids, image_ids, 0.25)[real]) <= TOL


@pytest.mark.gpu
def test_flex_forward_backward_on_cuda():
    """The CUDA path end to end: NativeMask.build on CUDA (compiled create_block_mask), compiled
    FlexAttention forward and backward through ``masked_attention``, against the dense reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch 2.13 has no FlexAttention backward on CPU (NotImplementedError), so "
                    "the CUDA path's backward cannot run here; its forward and mask are checked on CPU above")
    torch.backends.cuda.matmul.allow_tf32 = False
    doc_ids, image_ids = (t.cuda() for t in layout())
    mask = NativeMask.build(doc_ids, image_ids)
    assert mask.block_mask is not None and mask.plan is None
    for nq, nkv in ((4, 2), (2, 2)):
        q, k, v = (t.cuda().requires_grad_() for t in qkv(2, nq, nkv, 16))
        out = masked_attention(q, k, v, mask, 0.25)
        ref = dense_reference(q, k, v, doc_ids, image_ids, 0.25)
        real = (doc_ids >= 0).t()
        assert rel_err(out[real], ref[real]) <= TOL
        g = torch.Generator("cuda").manual_seed(1)
        grad_out = torch.randn(out.shape, device="cuda", generator=g) * real[..., None]
        reference = grads(ref, (q, k, v), grad_out.double())
        for name, ours, theirs in zip("qkv", grads(out, (q, k, v), grad_out), reference):
            assert rel_err(ours, theirs) <= TOL, name
