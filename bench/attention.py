"""Attention kernel benchmark on CPU: mask-following attention against the dense additive bias.

Ours: ``pretrain.model.masked_attention`` (``NativeMask.build`` once per micro-batch, then
``masked_attention``: the exact block-sparse path, fused CPU flash kernel calls only over the
allowed pairs). Baseline: what core_attention ran before it, SDPA with the [b, 1, s, s] additive
bias of ``native_attention_bias`` (built once per micro-batch) and V zero-padded to 2d so the fused
kernel takes it. Both forward + backward on the same q, k, v (fp32, one packed row), interleaved,
medians; mask and bias building are timed apart (once per micro-batch, shared by all layers).

Shapes: NEO's attention at the ``tiny`` widths (4 query heads, 2 KV heads, d=32: Q/K 64 wide) and
at h512 (8/4 heads, d=64, bench/model_step.py::cpu_medium), seq 4096, 8192, 16384, on two
synthetic packings (``stage1_row``, ``sft_row``).

FLOPs: executed = torch's FlopCounterMode over one forward and one backward (it does not know the
fused CPU kernel: ``register_cpu_attention_flops`` counts each call's full q x k rectangle, V at
the width the kernel runs it, 2d); allowed = allowed pairs (real tokens) x heads x 2 FLOP/MAC x
(2d + d) forward, x (3*2d + 2*d) backward. Their quotient is what the path wastes: padding V to 2d
alone makes it 4/3 forward, 5/4 backward, 14/11 = 1.27 over both.

Model step: the whole tiny NEO (6 layers, pre-Buffer + post-LLM + patch embedding) fwd+bwd on one
row of each packing at each length, the model's own path against the same model with its attention
swapped for the dense-bias baseline (built once per micro-batch, as the model built it before).
Runs in one spawned rank (megatron's parallel state).

    python -m bench.attention [--quick]
"""

from __future__ import annotations

import random
import time

import torch

from bench.results import Result

WIDTHS = {"tiny": (4, 2, 32), "h512": (8, 4, 64)}  # name -> (query heads, KV heads, head_dim d)


# ------------------------------------------------------------------------------------ packings


def _pack(seq: int, draw, rng: random.Random, min_doc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: documents from ``draw`` (lists of (kind, length) segments, kind "text" or "image")
    placed greedily, a document that does not fit is set aside (up to 20 in a row, as a packer with
    a look-ahead buffer does), the rest is padding (doc id -1). Returns doc_ids, image_ids [1, seq]."""
    doc_ids = torch.full((seq,), -1, dtype=torch.long)
    image_ids = torch.full((seq,), -1, dtype=torch.long)
    pos, doc, image, misses = 0, 0, 0, 0
    while seq - pos >= min_doc and misses < 20:
        segments = draw(rng)
        length = sum(n for _, n in segments)
        if pos + length > seq:
            misses += 1
            continue
        misses = 0
        doc_ids[pos : pos + length] = doc
        for kind, n in segments:
            if kind == "image":
                image_ids[pos : pos + n] = image
                image += 1
            pos += n
        doc += 1
    return doc_ids[None], image_ids[None]


def stage1_row(seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1-like: caption documents, "<|im_start|>user\\n<img>" (3-12 tokens), one image of
    256-4096 tokens (at most seq - 200), "</img>" + a caption (10-120 tokens)."""
    top = min(4096, seq - 200)

    def draw(rng):
        return [("text", rng.randint(3, 12)), ("image", rng.randint(256, top)),
                ("text", rng.randint(10, 120))]

    return _pack(seq, draw, random.Random(seed), min_doc=256 + 13)


def sft_row(seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT-like: multi-turn conversations. A system prompt (10-40 tokens), then 1-7 turns of user
    text (10-150), an image of 64-1024 tokens (first turn with probability 0.6, later turns 0.15)
    followed by more user text (5-60), and an answer (20-600). At seq 32768 such rows allow about
    4.4% of the pairs (mean of 5 seeds), at 16384 about 8%."""

    def draw(rng):
        segments = [("text", rng.randint(10, 40))]
        for turn in range(rng.randint(1, 7)):
            segments.append(("text", rng.randint(10, 150)))
            if rng.random() < (0.6 if turn == 0 else 0.15):
                segments += [("image", rng.randint(64, 1024)), ("text", rng.randint(5, 60))]
            segments.append(("text", rng.randint(20, 600)))
        return segments

    return _pack(seq, draw, random.Random(seed), min_doc=64)


PACKINGS = {"stage1": stage1_row, "sft": sft_row}


# ------------------------------------------------------------------------------------ one case


def dense_bias_attention(q, k, v_padded, bias, scale):
    """The baseline: core_attention before the mask-following path (bias, V padded, fused kernel)."""
    import torch.nn.functional as F

    d = q.shape[-1] // 2
    heads = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v_padded), attn_mask=bias, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])[..., :d]
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _median_seconds(fn, repeats: int) -> float:
    import statistics

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run_case(width: str, packing: str, seq: int, repeats: int, seed: int = 0) -> dict:
    from bench.timing import interleaved, median, paired_ratio
    from pretrain.model.masked_attention import NativeMask, masked_attention, register_cpu_attention_flops
    from pretrain.model.positions import native_attention_bias

    register_cpu_attention_flops()
    nq, nkv, d = WIDTHS[width]
    doc_ids, image_ids = PACKINGS[packing](seq, seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, 1, nq, 2 * d, generator=g).requires_grad_()
    k = torch.randn(seq, 1, nkv, 2 * d, generator=g).requires_grad_()
    v = torch.randn(seq, 1, nkv, d, generator=g).requires_grad_()
    v_padded = torch.nn.functional.pad(v.detach(), (0, d)).requires_grad_()
    grad_out = torch.randn(seq, 1, nq * d, generator=g)
    scale = d**-0.5

    build_s = _median_seconds(lambda: NativeMask.build(doc_ids, image_ids), repeats=3)
    bias_s = _median_seconds(lambda: native_attention_bias(doc_ids, image_ids, torch.float32), repeats=3)
    mask = NativeMask.build(doc_ids, image_ids)
    bias = native_attention_bias(doc_ids, image_ids, torch.float32)

    def fwd_ours():
        return masked_attention(q, k, v, mask, scale)

    def fwd_dense():
        return dense_bias_attention(q, k, v_padded, bias, scale)

    def step(fwd, inputs):
        return lambda: torch.autograd.grad(fwd(), inputs, grad_out)

    flops = {}
    for name, fwd, inputs in (("ours", fwd_ours, (q, k, v)), ("dense", fwd_dense, (q, k, v_padded))):
        out = [None]
        flops[name + "_fwd"] = _count(lambda: out.__setitem__(0, fwd()))  # noqa: B023 - used at once
        flops[name + "_bwd"] = _count(lambda: torch.autograd.grad(out[0], inputs, grad_out))  # noqa: B023
        del out
    cpu: dict[str, list[float]] = {}
    seconds = interleaved({"ours": step(fwd_ours, (q, k, v)), "dense": step(fwd_dense, (q, k, v_padded))},
                          repeats=repeats, warmup=0, cpu_seconds=cpu)
    pairs = mask.allowed_pairs()
    real = int((doc_ids >= 0).sum())
    return dict(
        width=width, packing=packing, seq=seq, docs=int(doc_ids.max()) + 1, images=int(image_ids.max()) + 1,
        padding=seq - real, allowed_fraction=pairs / seq**2, executed_pairs=mask.executed_pairs(),
        allowed_pairs=pairs, ours_s=median(seconds["ours"]), dense_s=median(seconds["dense"]),
        speedup=paired_ratio(seconds["ours"], seconds["dense"]), build_s=build_s, bias_s=bias_s,
        ours_cpu_s=median(cpu["ours"]), dense_cpu_s=median(cpu["dense"]),
        allowed_fwd=pairs * nq * 2 * 3 * d, allowed_bwd=pairs * nq * 2 * 8 * d, **flops,
    )


def cases(quick: bool, widths=tuple(WIDTHS)) -> list[tuple[str, str, int]]:
    if quick:
        return [("tiny", "stage1", 4096), ("tiny", "sft", 4096)]
    return [(w, p, s) for w in widths for p in PACKINGS for s in (4096, 8192, 16384)]


COLUMNS = ("width", "packing", "seq", "docs / images / pad", "allowed pairs", "ours ms", "dense ms",
           "speed-up (wall)", "speed-up (CPU time)", "executed / allowed pairs",
           "ours executed GFLOP fwd / bwd", "allowed GFLOP fwd / bwd",
           "executed / allowed FLOPs fwd / fwd+bwd",
           "dense executed GFLOP", "mask build ms", "bias build ms")


def table(rows: list[dict]) -> str:
    """All measurements of ``rows`` (from ``run_case``) as one Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        ours, allowed = r["ours_fwd"] + r["ours_bwd"], r["allowed_fwd"] + r["allowed_bwd"]
        cells = [
            r["width"], r["packing"], r["seq"], f"{r['docs']} / {r['images']} / {r['padding']}",
            f"{100 * r['allowed_fraction']:.1f}%", f"{1e3 * r['ours_s']:.0f}", f"{1e3 * r['dense_s']:.0f}",
            f"{r['speedup']:.1f}x", f"{r['dense_cpu_s'] / r['ours_cpu_s']:.1f}x",
            f"{r['executed_pairs'] / r['allowed_pairs']:.3f}",
            f"{r['ours_fwd'] / 1e9:.2f} / {r['ours_bwd'] / 1e9:.2f}",
            f"{r['allowed_fwd'] / 1e9:.2f} / {r['allowed_bwd'] / 1e9:.2f}",
            f"{r['ours_fwd'] / r['allowed_fwd']:.3f} / {ours / allowed:.3f}",
            f"{(r['dense_fwd'] + r['dense_bwd']) / 1e9:.1f}", f"{1e3 * r['build_s']:.1f}",
            f"{1e3 * r['bias_s']:.0f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def layout_batch(doc_ids: torch.Tensor, image_ids: torch.Tensor, vocab: int, patch_dim: int, seed: int = 0):
    """A training micro-batch with this row layout: random text ids, each image a 1 x n token grid
    of random pixels, supervised text (not the last token of a document)."""
    from bench.batches import FIRST_TEXT_ID, IMG_CONTEXT
    from pretrain.model.batch import NeoBatch

    g = torch.Generator().manual_seed(seed)
    image = image_ids >= 0
    tokens = torch.randint(FIRST_TEXT_ID, vocab, doc_ids.shape, generator=g).masked_fill(image, IMG_CONTEXT)
    sizes = torch.bincount(image_ids[image])
    last_of_doc = torch.ones_like(image)
    last_of_doc[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return NeoBatch(tokens=tokens, labels=torch.roll(tokens, -1, dims=1), loss_mask=(doc_ids >= 0) & ~image & ~last_of_doc,
                    doc_ids=doc_ids, image_ids=image_ids,
                    image_grids=torch.stack([torch.ones_like(sizes), sizes], dim=1),
                    patches=torch.randn(4 * int(sizes.sum()), patch_dim, generator=g))


def _model_step_body(cases: list[tuple[str, int]], repeats: int) -> list[dict]:
    import pretrain.model.native_attention as native_attention
    from bench.model_step import build_neo, ours_step, preset
    from bench.timing import interleaved, median, paired_ratio
    from pretrain.distributed import runtime
    from pretrain.model.positions import native_attention_bias

    neo = preset("tiny")
    ours = native_attention.masked_attention
    biases: dict[int, torch.Tensor] = {}

    def dense(q, k, v, mask, scale):  # the baseline, one bias per micro-batch (NativeMask object)
        if id(mask) not in biases:
            biases.clear()
            biases[id(mask)] = native_attention_bias(mask.doc_ids, mask.image_ids, q.dtype)
        return dense_bias_attention(q, k, torch.nn.functional.pad(v, (0, q.shape[-1] - v.shape[-1])),
                                    biases[id(mask)], scale)

    def with_kernel(kernel, step):
        def call():
            native_attention.masked_attention = kernel
            try:
                step()
            finally:
                native_attention.masked_attention = ours
        return call

    out = []
    with runtime.model_parallel(1, 1):
        model = build_neo(neo)
        for packing, seq in cases:
            doc_ids, image_ids = PACKINGS[packing](seq, 0)
            step = ours_step(model, layout_batch(doc_ids, image_ids, neo.vocab_size, 3 * neo.patch_size ** 2))
            secs = interleaved({"ours": with_kernel(ours, step), "dense": with_kernel(dense, step)},
                               repeats=repeats, warmup=1)
            out.append(dict(packing=packing, seq=seq, ours_s=median(secs["ours"]), dense_s=median(secs["dense"]),
                            speedup=paired_ratio(secs["ours"], secs["dense"]), images=int(image_ids.max()) + 1,
                            real=int((doc_ids >= 0).sum())))
    return out


def model_step_results(quick: bool) -> list[Result]:
    from pretrain.distributed import spawn

    cases = [("stage1", 4096)] if quick else [(p, s) for p in PACKINGS for s in (4096, 8192, 16384)]
    # One timed round after a warm-up: a dense step at 16k takes 30 s, and `make bench` has 10 minutes.
    rows = spawn.run(_model_step_body, 1, args=(cases, 1), timeout=1800)[0]
    return [Result(name=f"attention/model step tiny {r['packing']} s{r['seq']} fwd+bwd", value=1 / r["ours_s"],
                   unit="steps/s", baseline_value=1 / r["dense_s"],
                   notes=(f"the whole tiny NEO (6 layers) on one row ({r['real']} real tokens, {r['images']} images): "
                          f"{r['ours_s']:.2f} s with the mask-following attention, {r['dense_s']:.2f} s with the "
                          f"dense bias (paired median {r['speedup']:.1f}x); fp32")) for r in rows]


def run(quick: bool = False, repeats: int | None = None, rows_out: list | None = None,
        widths=tuple(WIDTHS)) -> list[Result]:
    """The ``attention`` section of ``python -m bench``: per case, fwd+bwd calls/s (ours vs the
    dense bias) and executed attention FLOPs (ours vs dense; lower is better)."""
    repeats = repeats or 2
    results, rows = [], []
    for width, packing, seq in cases(quick, widths):
        r = run_case(width, packing, seq, repeats)
        rows.append(r)
        name = f"attention/{width} {packing} s{seq}"
        ours, dense = r["ours_fwd"] + r["ours_bwd"], r["dense_fwd"] + r["dense_bwd"]
        allowed = r["allowed_fwd"] + r["allowed_bwd"]
        timing = (f"ours {1e3 * r['ours_s']:.0f} ms vs dense bias {1e3 * r['dense_s']:.0f} ms (paired median "
                  f"{r['speedup']:.1f}x, CPU time {r['dense_cpu_s'] / r['ours_cpu_s']:.1f}x); "
                  f"{100 * r['allowed_fraction']:.1f}% of pairs allowed; mask build "
                  f"{1e3 * r['build_s']:.1f} ms, bias build {1e3 * r['bias_s']:.0f} ms (each once per "
                  "micro-batch)")
        results.append(Result(name=f"{name} fwd+bwd", value=1 / r["ours_s"], unit="calls/s",
                              baseline_value=1 / r["dense_s"], notes=timing))
        flops = (f"allowed-pair FLOPs {allowed / 1e9:.2f} G; ours / allowed fwd "
                 f"{r['ours_fwd'] / r['allowed_fwd']:.3f}, fwd+bwd {ours / allowed:.3f} (V padded to 2d: "
                 f"4/3 fwd, 14/11 total); executed / allowed pairs "
                 f"{r['executed_pairs'] / r['allowed_pairs']:.3f}")
        results.append(Result(name=f"{name} executed attention FLOPs", value=ours / 1e9,
                              unit="GFLOP fwd+bwd (lower is better)", baseline_value=dense / 1e9,
                              notes=flops))
    if rows_out is not None:
        rows_out.extend(rows)
    return results + model_step_results(quick)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seq 4096 at tiny widths only: seconds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    t0 = time.perf_counter()
    run(args.quick, args.repeats, rows_out=rows, widths=tuple(args.widths))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, one row per case, "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
