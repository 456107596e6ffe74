"""Attention whose cost follows NEO's native mask (shared/spec/NEO_MODEL.md, "Attention mask").

    mask = NativeMask.build(doc_ids, image_ids)        # once per micro-batch, shared by all layers
    out = masked_attention(q, k, v, mask, scale)       # in every layer, as core_attention's kernel

Query q may attend key k iff they are in the same document AND (k <= q OR both are
``<IMG_CONTEXT>`` tokens of the same image). In packed rows most (q, k) pairs are masked (stage-1
rows at 16k allow ~14% of them, SFT rows at 32k ~5%), so a kernel that reads a dense [s, s] bias
spends most of its work on pairs it then throws away. Two backends, chosen by the device of q:

CUDA: FlexAttention (compiled) with a ``BlockMask`` whose ``mask_mod`` is the rule above: the
    kernel skips empty 128x128 blocks and applies the rule only inside partial ones. Q/K at 2d,
    V at d (no padding), GQA, scale as given. If it cannot run, a RuntimeError says why; there is
    no dense fallback.

CPU: exact block-sparse attention with backward (``_BlockSparseAttention``). Within a document
    the allowed keys of any query are one contiguous range that starts at the document's first
    token: text is causal, an image sees itself in full. So every maximal run of text or of one
    image ("segment") needs, besides the keys before it in its document (a plain rectangle, no
    mask), only its own diagonal block: a causal square for text, a full square for an image.
    Each of these is one call of torch's fused CPU flash kernel, with ``is_causal`` or no mask at
    all, never a materialised bias; the pieces of one query range are combined exactly by their
    log-sum-exp (as in ring attention), and the backward calls the kernel's backward for each
    piece with the combined output and log-sum-exp, which gives exact gradients. Causal squares
    are at most ``CAUSAL_BLOCK`` (256) wide, longer text runs become a staircase: the kernel
    computes such a square in full (its key blocks are 512 wide), which is what the FLOP count
    charges. Runs of tokens that attend to themselves only (padding, one-token documents) need no
    kernel: their output is their value.

Padding (doc id < 0) attends to itself only, in both backends: its output is its own value. The
dense rule would let padding attend causally to the padding run before it; no real token ever
attends to padding and padding is never supervised, so real outputs and all gradients are the
same, and a long padding tail costs nothing instead of its square.

Why V is padded on CPU: torch's fused CPU kernel needs one head dim for Q, K and V (it refuses
others: "Q/K/V should have the same head size"); with a narrower V, SDPA takes the unfused math
path, which keeps every score for backward and measured 1.7-2.6x the CPU time fwd+bwd on this
module's piece shapes (tiny and h512 widths, 256 x 4096 and 2048 x 2048). So V is zero-padded
from d to 2d inside this module and the padded half of the output dropped: the CPU path executes
2d + 2d multiply-adds per pair forward where 2d + d are useful (4/3), and 5 x 2d where
3 x 2d + 2 x d are useful backward (5/4); 14/11 = 1.27 over both. FlexAttention on CUDA needs no
padding.

FLOP accounting: ``allowed_pairs`` counts the pairs the rule allows (useful work);
``NativeMask.executed_pairs`` what the CPU path hands the kernel; torch's FlopCounterMode
does not know the CPU flash kernel, ``register_cpu_attention_flops`` teaches it (full
rectangles, as torch counts its GPU kernels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Side of the largest causal square handed to the CPU kernel (longer text runs become a staircase
# of such squares, each with the keys before it as a plain rectangle). The kernel works in key blocks
# of 512 and under is_causal skips only whole key blocks beyond a query block's diagonal, so it
# computes a square of up to 512 in full: the executed work of every call is its full rectangle.
# 256 measured fastest (fwd+bwd CPU time, SFT-like rows at 16k, tiny and h512 widths: 128 makes
# twice the calls, 512 wastes more of each square) and hands the kernel 1.10x the allowed pairs of
# such rows (1.18x at 512, 1.05x at 128).
CAUSAL_BLOCK = 256
# FlexAttention's block size (its default): the BlockMask skips empty blocks of this size.
FLEX_BLOCK = 128

# One kernel call: keys [k_lo, k_hi) for the query range it belongs to, causal (top-left aligned,
# used only on squares) or unmasked.
Piece = tuple[int, int, bool]
# A query range [q_lo, q_hi) and the pieces whose softmax-combination is its exact attention;
# no pieces: every query attends to itself only (padding, one-token documents): output = value.
QueryRange = tuple[int, int, tuple[Piece, ...]]


# ----------------------------------------------------------------------------------------- the rule


def native_rule(doc_q, doc_k, img_q, img_k, q_idx, k_idx):
    """The native mask, elementwise (tensors broadcast): True = q may attend k.

    Same document AND (k <= q OR both context tokens of the same image); padding (doc id < 0)
    only itself. The single definition used by FlexAttention's mask_mod and by ``allowed_pairs``'s
    test; positions.native_mask is the same rule with padding as one more document."""
    real = doc_q >= 0
    same_image = (img_q >= 0) & (img_q == img_k)
    return (q_idx == k_idx) | ((doc_q == doc_k) & real & ((k_idx <= q_idx) | same_image))


def allowed_pairs(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """LongTensor[b]: the (query, key) pairs of real tokens (doc id >= 0) the native mask allows,
    per row. A document of L tokens gives L*(L+1)/2 (causal, itself included), an image of n
    tokens inside it n*(n-1)/2 more (its pairs above the diagonal). Documents and images are
    counted by id (not by contiguous run), as the mask defines them: each (row, doc) and each
    (row, image, doc) becomes one integer key, and a 1-D unique counts the tokens per key (a few ms
    at 4 x 16k on the host; this runs every training step for the FLOP count).

    Useful attention FLOPs forward = pairs * heads * 2 * (2d + d) (QK^T over 2d, PV over d)."""
    b, s = doc_ids.shape
    real = doc_ids >= 0
    total = torch.zeros(b, dtype=torch.long, device=doc_ids.device)
    if not bool(real.any()):
        return total
    row = torch.arange(b, device=doc_ids.device)[:, None].expand(b, s)
    docs = int(doc_ids.max()) + 1
    images = max(int(image_ids.max()) + 1, 1)
    ctx = real & (image_ids >= 0)
    for key, where, extra, per_row in (((row * docs + doc_ids), real, 1, docs),
                                        ((row * images + image_ids) * docs + doc_ids, ctx, -1, images * docs)):
        groups, n = torch.unique(key[where], return_counts=True)  # equal keys of n tokens: n*(n+extra)/2 pairs
        total.index_add_(0, groups // per_row, n * (n + extra) // 2)
    return total


# ---------------------------------------------------------------------------------------- the mask


@dataclass(eq=False)
class NativeMask:
    """The native mask of one micro-batch in the form each backend needs. Build it once per
    micro-batch with ``NativeMask.build`` and hand the same object to every layer (megatron passes
    it through as ``attention_mask``).

    ``doc_ids``/``image_ids`` [b, s] stay with it (FlexAttention's mask_mod reads them, the tests'
    dense reference is built from them). On CUDA ``block_mask`` is FlexAttention's BlockMask; on CPU
    ``plan`` lists per row the query ranges and the kernel calls that cover exactly the allowed
    pairs (building it reads the layout on the host, once)."""

    doc_ids: torch.Tensor
    image_ids: torch.Tensor
    plan: list[list[QueryRange]] | None = None
    block_mask: object | None = None  # torch.nn.attention.flex_attention.BlockMask

    @classmethod
    def build(cls, doc_ids: torch.Tensor, image_ids: torch.Tensor) -> NativeMask:
        if doc_ids.shape != image_ids.shape or doc_ids.dim() != 2:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} and image_ids {tuple(image_ids.shape)} "
                             "must both be [b, s]")
        if doc_ids.device.type == "cuda":
            return cls(doc_ids, image_ids, block_mask=flex_block_mask(doc_ids, image_ids))
        return cls(doc_ids, image_ids, plan=cpu_plan(doc_ids, image_ids))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc_ids.shape)

    def allowed_pairs(self) -> int:
        """Pairs of real tokens the rule allows, whole micro-batch (see ``allowed_pairs``)."""
        return int(allowed_pairs(self.doc_ids, self.image_ids).sum())

    def executed_pairs(self) -> int:
        """(query, key) pairs the CPU path hands its kernel, whole micro-batch: the sum of the
        rectangles of all calls (causal squares in full: the kernel computes them in full)."""
        if self.plan is None:
            raise ValueError("executed_pairs counts the CPU plan; this mask was built for CUDA")
        return sum((q_hi - q_lo) * (k_hi - k_lo) for row in self.plan for q_lo, q_hi, pieces in row
                   for k_lo, k_hi, _ in pieces)


def cpu_plan(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> list[list[QueryRange]]:
    """Per row, the kernel calls of the block-sparse CPU path (see the module docstring).

    Segments are maximal runs of equal (doc id, image id). For a segment [a, b) of document D whose
    contiguous stretch began at ``start`` (and any earlier stretches of D, should its id recur):
    keys before the segment form full rectangles; an image adds its own full square (so the image
    is one call: keys [start, b)); text adds a causal square, in steps of ``CAUSAL_BLOCK``."""
    doc_ids, image_ids = doc_ids.cpu(), image_ids.cpu()
    b, s = doc_ids.shape
    change = torch.ones(b, s, dtype=torch.bool)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]) | (image_ids[:, 1:] != image_ids[:, :-1])
    plan = []
    for r in range(b):
        starts = change[r].nonzero().flatten().tolist()
        docs = doc_ids[r, starts].tolist()
        images = image_ids[r, starts].tolist()
        ends = starts[1:] + [s]
        row: list[QueryRange] = []
        stretches: dict[int, list[tuple[int, int]]] = {}  # doc id -> its finished contiguous stretches
        seen_images: set[tuple[int, int]] = set()
        start = 0  # first token of the current stretch of the current document
        for i, (a, e, doc, img) in enumerate(zip(starts, ends, docs, images)):
            if i == 0 or docs[i - 1] != doc:
                start = a
            if i + 1 == len(starts) or docs[i + 1] != doc:
                stretch_done = (start, e)
            else:
                stretch_done = None
            if doc < 0 or (img < 0 and e - a == 1 and a == start and doc not in stretches):
                # Padding, or a one-token document: attends to itself only. Runs of these (a padding
                # tail, many one-token documents) are one range, done without the kernel.
                if row and row[-1][1] == a and not row[-1][2]:
                    a = row.pop()[0]
                row.append((a, e, ()))
            else:
                earlier = tuple((x, y, False) for x, y in stretches.get(doc, ()))
                if img >= 0:
                    if (doc, img) in seen_images:
                        raise ValueError(f"row {r}: the context tokens of image {img} are not contiguous "
                                         f"(positions.native_mask would join its runs)")
                    seen_images.add((doc, img))
                    row.append((a, e, earlier + ((start, e, False),)))
                else:
                    for lo in range(a, e, CAUSAL_BLOCK):
                        hi = min(lo + CAUSAL_BLOCK, e)
                        before = ((start, lo, False),) if lo > start else ()
                        row.append((lo, hi, earlier + before + ((lo, hi, True),)))
            if stretch_done is not None:
                stretches.setdefault(doc, []).append(stretch_done)
        plan.append(row)
    return plan


# ------------------------------------------------------------------------------------ entry point


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: NativeMask,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, native mask) v with GQA, at the cost of the allowed pairs.

    q [s, b, nq, 2d], k [s, b, nkv, 2d], v [s, b, nkv, d] (or zero-padded to 2d, as NativeQKV
    gives it today: only its first d channels are read), ``mask`` from ``NativeMask.build`` on the
    same device. Returns [s, b, nq*d]. CUDA: FlexAttention; CPU: the block-sparse kernel calls."""
    s, b, nq, two_d = q.shape
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"mask is for [b, s] = {list(mask.shape)}, attention got s={s}, b={b}")
    if nq % k.shape[2]:
        raise ValueError(f"{nq} query heads do not split into {k.shape[2]} KV groups")
    d = two_d // 2
    if v.shape[-1] not in (d, two_d):
        raise ValueError(f"v has head dim {v.shape[-1]}; expected d={d} (or {two_d}, zero-padded)")
    if q.device.type == "cuda":
        return flex_masked_attention(q, k, v[..., :d], mask, scale)
    if q.device.type != "cpu":
        raise RuntimeError(f"masked_attention has no backend for device {q.device.type!r} "
                           "(CUDA: FlexAttention, CPU: block-sparse)")
    if mask.plan is None:
        raise ValueError("this NativeMask was built on CUDA; build it from CPU doc_ids/image_ids "
                         "for CPU attention")
    return _BlockSparseAttention.apply(q, k, v, mask.plan, scale)


# ------------------------------------------------------------------------------------------- CPU

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads(x: torch.Tensor, r: int) -> torch.Tensor:
    """Row r of [s, b, n, D] as the kernel's [1, n, s, D] (a view)."""
    return x[:, r].transpose(0, 1).unsqueeze(0)


class _BlockSparseAttention(torch.autograd.Function):
    """The CPU path: per row, per query range, one fused-kernel call per piece (module docstring).

    Saves q, k, v, the output [s, b, nq, d] and the log-sum-exp [b, nq, s] (what a flash kernel
    keeps), nothing of size s*s. Backward recomputes per piece with the kernel's own backward.
    V runs at 2d (the kernel's one head dim): a d-wide v is zero-padded; a v that comes 2d wide is
    used as it is, since its second half only feeds the output half that is dropped and, backward,
    meets a zero gradient (so it never reaches a result, and its gradient there is 0)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        s, b, nq, two_d = q.shape
        d = two_d // 2
        group = nq // k.shape[2]
        vp = _pad_to(v, two_d)  # a 2d-wide v's second half is never read into a result (class docstring)
        out = q.new_empty(s, b, nq, d)
        lse = torch.empty(b, nq, s, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for r, ranges in enumerate(plan):
            qr, kr, vr, out_r = _heads(q, r), _heads(k, r), _heads(vp, r), out[:, r]
            for q_lo, q_hi, pieces in ranges:
                if not pieces:  # itself only (padding, one-token documents): the output is the value
                    out_r[q_lo:q_hi] = v[q_lo:q_hi, r, :, :d].repeat_interleave(group, dim=1)
                    lse[r, :, q_lo:q_hi] = 0.0  # unused: the backward of these ranges needs no kernel
                    continue
                qp = qr[:, :, q_lo:q_hi]
                o = l = None
                for lo, hi, causal in pieces:
                    o_i, l_i = _flash(qp, kr[:, :, lo:hi], vr[:, :, lo:hi], 0.0, causal, scale=scale)
                    if o is None:
                        o, l = o_i[..., :d], l_i
                    else:  # softmax over both pieces' keys: o's weight is e^l / (e^l + e^l_i)
                        w = torch.sigmoid(l - l_i).unsqueeze(-1)
                        o = torch.lerp(o_i[..., :d].to(w.dtype), o.to(w.dtype), w)
                        l = torch.logaddexp(l, l_i)
                out_r[q_lo:q_hi] = o[0].transpose(0, 1)
                lse[r, :, q_lo:q_hi] = l[0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out.view(s, b, nq * d)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        s, b, nq, two_d = q.shape
        d = two_d // 2
        nkv = k.shape[2]
        group = nq // nkv
        grad = grad.reshape(s, b, nq, d)
        vp = _pad_to(v, two_d)
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        grad_v = torch.zeros(s, b, nkv, two_d, dtype=v.dtype, device=v.device)
        grad_v_out = grad_v[..., : v.shape[-1]]
        for r, ranges in enumerate(ctx.plan):
            qr, kr, vr = _heads(q, r), _heads(k, r), _heads(vp, r)
            # The kernel reads out and grad at V's padded width; zeros in the padding keep its
            # rowsum(grad * out) and dV exact.
            grad_r = _heads(_pad_to(grad[:, r].unsqueeze(1), two_d), 0)
            out_r = _heads(_pad_to(out[:, r].unsqueeze(1), two_d), 0)
            lse_r = lse[r : r + 1]
            gq, gk, gv = _heads(grad_q, r), _heads(grad_k, r), _heads(grad_v, r)
            for q_lo, q_hi, pieces in ranges:
                if not pieces:  # out = v of its KV head: the gradient goes to v alone
                    gv[0, :, q_lo:q_hi, :d] += grad_r[0, :, q_lo:q_hi, :d].unflatten(0, (nkv, group)).sum(1)
                    continue
                rows = slice(q_lo, q_hi)
                for lo, hi, causal in pieces:
                    keys = slice(lo, hi)
                    dq, dk, dv = _flash_backward(
                        grad_r[:, :, rows], qr[:, :, rows], kr[:, :, keys], vr[:, :, keys], out_r[:, :, rows],
                        lse_r[:, :, rows], 0.0, causal, scale=ctx.scale)
                    gq[:, :, rows] += dq
                    gk[:, :, keys] += dk
                    gv[:, :, keys] += dv
        return grad_q, grad_k, grad_v_out, None, None


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


@functools.cache
def register_cpu_attention_flops() -> None:
    """Teach torch's FlopCounterMode the fused CPU attention kernel (forward and backward), which
    it does not know (it counts it as 0). Counted like torch counts its GPU flash kernels: the
    full q x k rectangle of every call, is_causal or not (for this module's causal squares of at
    most CAUSAL_BLOCK that is what the kernel computes; for a longer causal call, e.g. SDPA's
    is_causal on a whole row, it is an upper bound). Idempotent; call it before counting."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                  **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ------------------------------------------------------------------------------------------ CUDA


def flex_mask_mod(doc_ids: torch.Tensor, image_ids: torch.Tensor):
    """FlexAttention mask_mod of the native rule (``native_rule``) over [b, s] layout tensors."""

    def mask_mod(b, h, q_idx, kv_idx):
        return native_rule(doc_ids[b, q_idx], doc_ids[b, kv_idx], image_ids[b, q_idx], image_ids[b, kv_idx],
                           q_idx, kv_idx)

    return mask_mod


def flex_block_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor, compile: bool | None = None):
    """FlexAttention's BlockMask of the native mask: one per row, shared by all heads and layers.

    ``compile`` (default: on CUDA) builds it with a compiled create_block_mask, which never holds
    the [b, s, s] mask the eager one materialises (4 GiB of booleans per row at 64k)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = doc_ids.shape
    if compile is None:
        compile = doc_ids.device.type == "cuda"
    make = _compiled_create_block_mask() if compile else create_block_mask
    try:
        with _no_eager_fallback():
            return make(flex_mask_mod(doc_ids, image_ids), b, None, s, s, device=doc_ids.device,
                        BLOCK_SIZE=FLEX_BLOCK)
    except Exception as exc:  # noqa: BLE001 - re-raised with the cause named
        raise RuntimeError(f"could not build FlexAttention's block mask on {_device_name(doc_ids.device)}: "
                           f"{type(exc).__name__}: {exc}") from exc


def flex_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: NativeMask, scale: float,
                          flex=None) -> torch.Tensor:
    """FlexAttention with the mask's BlockMask: q [s, b, nq, 2d], k [s, b, nkv, 2d], v [s, b, nkv, d]
    -> [s, b, nq*d]. ``flex`` defaults to the compiled kernel (CUDA); the tests pass the eager one
    to check the mask on CPU (forward only: torch has no FlexAttention backward on CPU)."""
    if mask.block_mask is None:
        raise ValueError("this NativeMask has no BlockMask (built on CPU); build it from CUDA "
                         "doc_ids/image_ids")
    if flex is None:
        _check_flex_can_run(q.device)
        flex = _compiled_flex()
    s, b, nq, _ = q.shape
    heads = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731 - [s, b, n, D] -> [b, n, s, D] (a view)
    try:
        with _no_eager_fallback():
            out = flex(heads(q), heads(k), heads(v), block_mask=mask.block_mask, scale=scale,
                       enable_gqa=nq != k.shape[2])
    except Exception as exc:  # noqa: BLE001 - re-raised with the cause named, never a dense fallback
        raise RuntimeError(f"FlexAttention failed on {_device_name(q.device)} (q {list(q.shape)} {q.dtype}); "
                           f"there is no dense fallback: {type(exc).__name__}: {exc}") from exc
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def _no_eager_fallback():
    """torch.compile runs a function eagerly once it has been recompiled recompile_limit (8) times
    (new shapes); eager FlexAttention is the unfused kernel that materialises every score. Raise
    instead: no silent dense fallback."""
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return str(device)


def _check_flex_can_run(device: torch.device) -> None:
    """FlexAttention on CUDA is a Triton kernel generated by torch.compile: say plainly when that
    cannot work here, before a long compile fails with a less direct message."""
    if device.type != "cuda":
        raise RuntimeError(f"the compiled FlexAttention path runs on CUDA; got {device}")
    from torch.utils._triton import has_triton_package

    if not has_triton_package():
        raise RuntimeError("FlexAttention on CUDA needs Triton (torch.compile's GPU code generator), which "
                           "is not installed; install the triton that matches this torch build")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        raise RuntimeError(f"FlexAttention's Triton kernels need a GPU of compute capability 7.0 or newer; "
                           f"{_device_name(device)} is older")
