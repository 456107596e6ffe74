"""Command line: `python -m data_prep {build,merge,synthetic,verify,tokenizer} ...` (see --help)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

from data_prep.build import BuildOptions, build_record, run_build
from data_prep.energon_prepare import EnergonPrepareError
from data_prep.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_FORMATS,
    PRETRAIN_MAX_PIXELS,
    PRETRAIN_MIN_PIXELS,
    ImageOptions,
)
from data_prep.manifest import file_digest
from data_prep.merge import MergeError, merge
from data_prep.output_dir import OutputDirError, prepare_output
from data_prep.parts import PartBusyError, PartSlice, check_part_args, part_lock, prepare_part
from data_prep.sources import SOURCE_FORMATS, SourceError, SourceOptions, count_inputs, entries_for


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser, min_pixels: int, max_pixels: int) -> None:
    g = p.add_argument_group("images and shards")
    g.add_argument(
        "--min-pixels", type=_positive, default=min_pixels, help=f"smart-resize floor (default {min_pixels})"
    )
    g.add_argument(
        "--max-pixels",
        type=_positive,
        default=max_pixels,
        help=f"smart-resize ceiling (default {max_pixels})",
    )
    g.add_argument(
        "--multi-image-budget",
        choices=("spec", "reference"),
        default="spec",
        help="'reference': records with n>1 images give each max(max_pixels*2//n, min_pixels), as the "
        "reference loader does (default: spec, every image gets max_pixels)",
    )
    g.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="decoded pixel count over which an image is a decompression bomb "
        f"(default {DEFAULT_MAX_IMAGE_PIXELS})",
    )
    g.add_argument(
        "--image-format",
        choices=sorted(IMAGE_FORMATS),
        default="jpeg",
        help="stored image format (default jpeg)",
    )
    g.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    g.add_argument(
        "--shard-max-samples", type=_positive, default=10_000, help="samples per shard (default 10000)"
    )
    g.add_argument(
        "--shard-max-bytes", type=_positive, default=1 << 30, help="bytes per shard (default 1 GiB)"
    )
    g.add_argument(
        "--shard-prefix", default="shard", help="shard names are PREFIX-NNNNNN.tar (default shard)"
    )
    r = p.add_argument_group("running")
    r.add_argument(
        "--workers",
        type=_positive,
        default=_cpus(),
        help="worker processes (default: usable CPUs); the output is byte-identical for any value",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing build in --output")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--no-energon",
        action="store_true",
        help="skip `energon prepare` (the directory will not load in Energon)",
    )


def _build_options(args: argparse.Namespace, image_root: str | None, tokenizer: str | None) -> BuildOptions:
    image = ImageOptions(
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        max_image_pixels=args.max_image_pixels,
        image_format=args.image_format,
        quality=args.quality,
        multi_image_budget=args.multi_image_budget,
    )
    return BuildOptions(
        image=image,
        image_root=image_root,
        tokenizer=tokenizer,
        shard_prefix=args.shard_prefix,
        shard_max_samples=args.shard_max_samples,
        shard_max_bytes=args.shard_max_bytes,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        energon=not args.no_energon,
    )


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (what is wrong, where help is), exit 2: no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m data_prep", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="raw annotations + images -> validated WebDataset shards")
    b.add_argument("--format", required=True, choices=SOURCE_FORMATS)
    b.add_argument(
        "--annotations",
        required=True,
        nargs="+",
        type=Path,
        help="neo-json: .json/.jsonl; captions: .tsv/.csv/.parquet; text: .jsonl/.json",
    )
    b.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="relative image paths are resolved against it (default: the first annotation file's directory)",
    )
    b.add_argument("--output", required=True, type=Path)
    b.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer dir: adds text-token counts")
    b.add_argument(
        "--id-field", default="id", help="neo-json/text: record id field (default id; positional if absent)"
    )
    b.add_argument("--text-field", default="text", help="text: the text field (default text)")
    b.add_argument(
        "--image-column", default="image", help="captions: image path/bytes column (default image)"
    )
    b.add_argument("--caption-column", default="caption", help="captions: caption column (default caption)")
    b.add_argument("--id-column", default=None, help="captions: id column (default: positional ids)")
    _add_common(b, PRETRAIN_MIN_PIXELS, PRETRAIN_MAX_PIXELS)
    pg = b.add_argument_group("parts (one build spread over N jobs; then `merge OUTPUT`)")
    pg.add_argument(
        "--parts",
        type=int,
        default=None,
        metavar="N",
        help="split the inputs into N contiguous slices by input index (with --part)",
    )
    pg.add_argument(
        "--part",
        type=int,
        default=None,
        metavar="I",
        help="build slice I (0 <= I < N) into OUTPUT/parts/part-IIIII; a complete part of the same "
        "build is skipped, a half-written one rebuilt",
    )

    m = sub.add_parser("merge", help="make the parts of a build (build --parts N --part I) one data set")
    m.add_argument("output", type=Path, metavar="OUTPUT", help="the --output the parts were built with")
    m.add_argument("--overwrite", action="store_true", help="replace a data set already in OUTPUT")
    m.add_argument(
        "--no-energon",
        action="store_true",
        help="skip `energon prepare` (the directory will not load in Energon)",
    )

    from data_prep.synthetic import SPLITS, SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS

    s = sub.add_parser("synthetic", help="the embedded coloured-shapes data set (+ its tokenizer)")
    s.add_argument("--output", required=True, type=Path)
    s.add_argument("--num", required=True, type=_positive, help="number of inputs to generate")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--split", choices=SPLITS, default="train", help="train and heldout never share an image or text"
    )
    s.add_argument(
        "--mix", default=None, help="kind weights, e.g. caption=0.35,conversation=0.5,text=0.15 (the default)"
    )
    s.add_argument(
        "--answer-hint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every question with ' Answer with one word.' (default; the demo's SFT and held-out sets go without)",
    )
    s.add_argument(
        "--vocab-size", type=_positive, default=1024, help="demo tokenizer vocabulary (default 1024)"
    )
    s.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="copy this tokenizer dir to OUTPUT/tokenizer instead of training one "
        "(e.g. give the heldout split the train split's tokenizer)",
    )
    _add_common(s, SYNTHETIC_MIN_PIXELS, SYNTHETIC_MAX_PIXELS)

    v = sub.add_parser("verify", help="decode every sample of every shard and check it against the manifest")
    v.add_argument("directory", type=Path)
    v.add_argument("--no-energon", action="store_true", help="do not require Energon metadata")

    t = sub.add_parser("tokenizer", help="train a small byte-level BPE tokenizer on built data sets")
    t.add_argument("--data", required=True, nargs="+", type=Path, help="built data set directories")
    t.add_argument("--output", required=True, type=Path)
    t.add_argument("--vocab-size", type=_positive, default=1024)
    t.add_argument("--overwrite", action="store_true")
    return ap


def cmd_build(args: argparse.Namespace) -> int:
    check_part_args(args.parts, args.part)
    annotations = [Path(p) for p in args.annotations]
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{args.tokenizer / 'tokenizer.json'} not found")
    image_root = args.image_root if args.image_root is not None else annotations[0].parent
    options = _build_options(args, str(image_root), str(args.tokenizer) if args.tokenizer else None)
    source_options = SourceOptions(
        id_field=args.id_field or None,
        text_field=args.text_field,
        image_column=args.image_column,
        caption_column=args.caption_column,
        id_column=args.id_column,
    )
    entries = entries_for(args.format, annotations, source_options)  # whole-file problems raise here
    source = {
        "command": "build",
        "source_format": args.format,
        "annotations": [file_digest(p) for p in annotations],
        "source_options": dataclasses.asdict(source_options),
    }
    if args.parts is not None:
        return _build_part(args, annotations, source_options, entries, options, source)
    result = run_build(entries, args.output, options, source, describe=f"build {args.format}")
    for name in result.kept:
        print(f"data_prep build: kept {args.output / name} (yours, not a build output)")
    print(result.summary)
    return 0


def _build_part(args, annotations, source_options, entries, options, source) -> int:
    """--parts N --part I: one slice of the build into OUTPUT/parts/part-IIIII (data_prep.parts)."""
    with part_lock(args.output, args.part, args.parts, args.overwrite):
        return _build_locked_part(args, annotations, source_options, entries, options, source)


def _build_locked_part(args, annotations, source_options, entries, options, source) -> int:
    plan = prepare_part(args.output, args.part, args.parts, build_record(source, options), args.overwrite)
    if plan.note:
        print(plan.note, flush=True)
    if plan.skip:
        return 0
    t0 = time.perf_counter()
    part = PartSlice(args.part, args.parts, count_inputs(args.format, annotations, source_options))
    print(
        f"data_prep build: {part.label}: inputs [{part.first}, {part.end}) of {part.total} "
        f"(counted in {time.perf_counter() - t0:.1f} s) -> {plan.directory}",
        flush=True,
    )
    result = run_build(
        entries, plan.directory, options, source, describe=part.label, prepared=True, part=part
    )
    print(result.summary)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    result = merge(args.output, energon=not args.no_energon, overwrite=args.overwrite)
    for name in result.kept:
        print(f"data_prep merge: kept {args.output / name} (yours, not a build output)")
    print(result.summary)
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from data_prep import synthetic
    from data_prep.tokenizer import train_tokenizer, training_texts

    mix = synthetic.parse_mix(args.mix)
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{args.tokenizer / 'tokenizer.json'} not found")
    items = synthetic.make_items(args.num, args.seed, args.split, mix, args.answer_hint)
    output = Path(args.output)
    prepare_output(output, args.overwrite, keep=())  # synthetic writes tokenizer/: an output here
    tokenizer_dir = output / "tokenizer"
    if args.tokenizer is not None:  # share one vocabulary between train and heldout
        shutil.copytree(args.tokenizer, tokenizer_dir)
    else:
        texts = [
            text
            for item in items
            for text in training_texts(
                {"kind": item.kind, "text": item.text, "conversations": item.conversations}
            )
        ]
        train_tokenizer(texts, tokenizer_dir, args.vocab_size)
    options = _build_options(args, None, str(tokenizer_dir))
    source = {
        "command": "synthetic",
        "source_format": "synthetic",
        "generator": {
            "version": synthetic.GENERATOR_VERSION,
            "num": args.num,
            "seed": args.seed,
            "split": args.split,
            "mix": mix,
            "answer_hint": args.answer_hint,
            "vocab_size": None if args.tokenizer is not None else args.vocab_size,
        },
    }
    result = run_build(
        iter(items),
        output,
        options,
        source,
        total=len(items),
        describe=f"synthetic {args.split}",
        prepared=True,
    )
    print(result.summary)
    print(f"tokenizer: {tokenizer_dir}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify

    report = verify(args.directory, check_energon=not args.no_energon)
    for error in report.errors[:200]:
        print(f"  {error}", file=sys.stderr)
    if len(report.errors) > 200:
        print(f"  ... and {len(report.errors) - 200} more", file=sys.stderr)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.tokenizer import texts_from_data, train_tokenizer

    path = train_tokenizer(texts_from_data(args.data), args.output, args.vocab_size, overwrite=args.overwrite)
    print(f"tokenizer: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {
        "build": cmd_build,
        "merge": cmd_merge,
        "synthetic": cmd_synthetic,
        "verify": cmd_verify,
        "tokenizer": cmd_tokenizer,
    }
    try:
        return commands[args.command](args)
    except (
        SourceError,
        OutputDirError,
        FileExistsError,
        FileNotFoundError,
        EnergonPrepareError,
        MergeError,
        PartBusyError,
        ValueError,
    ) as exc:  # usage errors (2), except energon prepare's failure, parts that do not merge, a busy part (1)
        _error(args.command, str(exc))
        return 1 if isinstance(exc, (EnergonPrepareError, MergeError, PartBusyError)) else 2
    except OSError as exc:  # the disk, not the user: a write that failed half way (full, read-only...)
        unfinished = {
            "build": "; the build did not finish (no manifest.json)",
            "synthetic": "; the build did not finish (no manifest.json)",
            "merge": "; the merge did not finish (no manifest.json; run it again)",
        }.get(args.command, "")
        _error(args.command, f"{exc}{unfinished}")
        return 1


def _error(command: str, message: str) -> None:
    """The one line a failed command prints."""
    print(f"data_prep {command}: error: {' '.join(message.splitlines())}", file=sys.stderr)
