"""Look at what the trainer will see, and time it.

    python -m pretrain.data show  DATA [--seq-len N] [--rows 2]      # decoded packed rows
    python -m pretrain.data bench DATA [--seq-len N] [--batches 50]  # samples/s, tokens/s, fill

DATA is a data_prep output directory or an Energon blend YAML (then pass --tokenizer).
``bench`` with ``--workers 0`` measures one loader worker's work (cook, template, tokenize,
decode, patchify, pack, collate) in this process, on one thread.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from pretrain.data.loader import LoaderConfig, NeoDataLoader

_CONTEXT_RUN = re.compile("(?:<IMG_CONTEXT>)+")


def _loader(args) -> NeoDataLoader:
    cfg = LoaderConfig(
        path=args.data,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        num_workers=args.workers,
        seed=args.seed,
        packing_buffer_size=args.packing_buffer,
    )
    return NeoDataLoader(cfg)


def cmd_show(args) -> int:
    loader = _loader(args)
    tok = loader.task_encoder.template.tokenizer
    shown = 0
    while shown < args.rows:
        batch = next(loader)
        for r in range(batch.tokens.shape[0]):
            if shown == args.rows:
                break
            real = int((batch.doc_ids[r] >= 0).sum())
            print(
                f"--- row {shown}: {len(loader.last.keys[r])} documents {loader.last.keys[r]}, fill {real / args.seq_len:.3f}"
            )
            text = tok.decode(batch.tokens[r, :real].tolist())
            print(
                _CONTEXT_RUN.sub(lambda m: f"<IMG_CONTEXT>x{len(m.group(0)) // len('<IMG_CONTEXT>')}", text)
            )
            supervised = tok.decode(batch.labels[r][batch.loss_mask[r]].tolist())
            print(f"--- supervised targets: {supervised!r}")
            shown += 1
    loader.close()
    return 0


def cmd_bench(args) -> int:
    loader = _loader(args)
    next(loader)  # start-up (workers, first buffer) is not throughput
    loader.interval_stats()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    elapsed = time.perf_counter() - t0
    s = loader.interval_stats()
    loader.close()
    print(
        f"{s.samples / elapsed:.0f} samples/s ({1000 * elapsed / max(s.samples, 1):.2f} ms/sample), "
        f"{s.real_tokens / elapsed:.0f} tokens/s, {s.batches} batches of {args.micro_batch_size}x{args.seq_len} "
        f"in {elapsed:.2f} s with {args.workers} worker(s); pack fill {s.fill:.3f}; "
        f"skipped too long {s.skipped_too_long}, sample errors {s.sample_errors}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("show", "print decoded packed rows"), ("bench", "time the data path")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("data")
        p.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default DATA/tokenizer)")
        p.add_argument("--seq-len", type=int, default=1024)
        p.add_argument("--micro-batch-size", type=int, default=1)
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--packing-buffer", type=int, default=512)
        if name == "show":
            p.add_argument("--rows", type=int, default=2)
        else:
            p.add_argument("--batches", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return {"show": cmd_show, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
