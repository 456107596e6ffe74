"""Benchmark (not a test): data_prep build throughput on 512x512 JPEG inputs, 1 and 2 workers.

    python bench/data_prep_build.py [--num 2000] [--workers 1 2] [--energon] [--parts 3]
                                    [--merge-samples 3000] [--annotation-records 200000]

Writes photo-like 512x512 JPEGs (smooth gradients plus noise, ~quality 90) and a caption TSV to
a temporary directory, builds each worker count through the real CLI code path (progress bar
off, Energon indexing off unless --energon, as it is a fixed cost per build rather than per
sample) and prints samples/s and MB/s (input JPEG bytes read, shard bytes written). Also checks
that every worker count produced byte-identical shards.

Parts (data_prep.parts / data_prep.merge), through ``data_prep.cli.main``:
  * each part of ``--parts`` at the same worker count as the single build, one after another:
    its samples/s (its inputs over its wall time, counting pass and reading ahead to its slice
    included) against the single build's;
  * merge time per 1,000 shards: ``--merge-samples`` tiny text samples built as 3 parts with one
    sample per shard, merged with and without `energon prepare`;
  * the annotation-only passes every part makes, on ``--annotation-records`` neo-json records
    (no images): the counting pass (T) and the reading of all entries through dedupe_keys, in
    microseconds per input and extrapolated to 390M inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.build import BuildOptions, dedupe_keys, run_build  # noqa: E402
from data_prep.cli import main as cli_main  # noqa: E402
from data_prep.images import ImageOptions  # noqa: E402
from data_prep.parts import part_dir  # noqa: E402
from data_prep.sources import SourceOptions, count_inputs, entries_for  # noqa: E402

PROJECTED_INPUTS = 390_000_000


def make_inputs(root: Path, num: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32) / 512.0
    rows = ["image\tcaption"]
    for i in range(num):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], axis=-1)
        noise = rng.normal(0, 12, (512, 512, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i:06d}.jpg", quality=90)
        rows.append(f"images/{i:06d}.jpg\tA synthetic photo number {i}.")
    tsv = root / "captions.tsv"
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tsv


def run(tsv: Path, output: Path, workers: int, energon: bool) -> tuple[float, dict]:
    options = BuildOptions(
        image=ImageOptions(), image_root=str(tsv.parent), workers=workers, progress=False, energon=energon
    )
    entries = entries_for("captions", [tsv], SourceOptions())
    t0 = time.perf_counter()
    result = run_build(entries, output, options, {"command": "bench"}, describe="bench")
    return time.perf_counter() - t0, result.manifest


def cli(*args) -> float:
    """Seconds of one `python -m data_prep ...` command, run in this process (output swallowed)."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"data_prep {args[0]} failed ({code})")
    return time.perf_counter() - t0


def run_parts(tsv: Path, output: Path, workers: int, parts: int) -> list[tuple[int, float]]:
    """Every part of ``parts`` built in turn: (its inputs, its seconds)."""
    rows = []
    for i in range(parts):
        seconds = cli(
            "build", "--format", "captions", "--annotations", tsv, "--output", output,
            "--workers", workers, "--parts", parts, "--part", i, "--no-progress",
        )
        manifest = json.loads((part_dir(output, i) / "manifest.json").read_text())
        rows.append((manifest["counts"]["inputs"], seconds))
    return rows


def merge_per_1000_shards(root: Path, num: int) -> None:
    """Merge time of ``num`` one-sample shards (3 parts), without and with `energon prepare`."""
    root.mkdir(parents=True, exist_ok=True)
    ann = root / "tiny.jsonl"
    lines = (json.dumps({"id": f"t{i}", "text": f"tiny sample {i}"}) + "\n" for i in range(num))
    ann.write_text("".join(lines), encoding="utf-8")
    out = root / "merge-out"
    t0 = time.perf_counter()
    for i in range(3):
        cli("build", "--format", "text", "--annotations", ann, "--output", out, "--workers", 1,
            "--shard-max-samples", 1, "--parts", 3, "--part", i, "--no-progress")
    built = time.perf_counter() - t0
    spare = root / "parts-copy"
    shutil.copytree(out / "parts", spare, copy_function=os.link)
    plain = cli("merge", out, "--no-energon")
    shards = len(json.loads((out / "manifest.json").read_text())["shards"])
    out2 = root / "merge-out-energon"
    out2.mkdir()
    os.replace(spare, out2 / "parts")
    energon = cli("merge", out2)
    print(
        f"merge: {shards} shards (3 parts of 1-sample shards, built in {built:.1f} s): "
        f"{plain:.2f} s without energon = {1000 * plain / shards:.2f} s per 1,000 shards; "
        f"{energon:.2f} s with `energon prepare` = {1000 * energon / shards:.2f} s per 1,000 shards"
    )


def annotation_passes(root: Path, num: int) -> None:
    """The annotation-only work of a part: counting T, and reading entries through dedupe_keys."""
    ann = root / "big.jsonl"
    with open(ann, "w", encoding="utf-8") as f:
        for i in range(num):
            record = {
                "id": f"sample-{i:09d}",
                "image": f"images/{i % 1000:04d}/{i:09d}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe this image in detail."},
                    {"from": "gpt", "value": "A photo of a scene with several objects in it. " * 3},
                ],
            }
            f.write(json.dumps(record) + "\n")
    options = SourceOptions()
    t0 = time.perf_counter()
    total = count_inputs("neo-json", [ann], options)
    counting = time.perf_counter() - t0
    t0 = time.perf_counter()
    read = sum(1 for _ in dedupe_keys(entries_for("neo-json", [ann], options)))
    reading = time.perf_counter() - t0
    assert total == read == num
    per_count, per_read = counting / num, reading / num
    hours = lambda per: per * PROJECTED_INPUTS / 3600  # noqa: E731
    print(
        f"annotation passes ({num} neo-json records, {ann.stat().st_size / 1e6:.0f} MB, one core): "
        f"counting {1e6 * per_count:.1f} us/input, reading through dedupe_keys "
        f"{1e6 * per_read:.1f} us/input; at {PROJECTED_INPUTS / 1e6:.0f}M inputs every part counts for "
        f"{hours(per_count):.1f} h and part I of N reads I/N of {hours(per_read):.1f} h before its slice "
        "(the last part nearly all of it)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--energon", action="store_true", help="include `energon prepare` in the timing")
    ap.add_argument("--parts", type=int, default=3, help="also build as this many parts (0: not)")
    ap.add_argument("--merge-samples", type=int, default=3000, help="one-sample shards to merge (0: no)")
    ap.add_argument(
        "--annotation-records", type=int, default=200_000, help="records for the annotation passes (0: no)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tsv = make_inputs(tmp / "raw", args.num)
        in_bytes = sum(p.stat().st_size for p in (tmp / "raw" / "images").iterdir())
        print(
            f"inputs: {args.num} JPEGs 512x512, {in_bytes / 1e6:.1f} MB "
            f"(made in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs"
        )
        digests = {}
        for workers in args.workers:
            seconds, manifest = run(tsv, tmp / f"out-w{workers}", workers, args.energon)
            out_bytes = manifest["total_bytes"]
            n = manifest["counts"]["written"]
            digests[workers] = hashlib.sha256(
                "".join(s["sha256"] for s in manifest["shards"]).encode()
            ).hexdigest()
            print(
                f"workers={workers}: {n} samples in {seconds:.2f} s = {n / seconds:.0f} samples/s "
                f"({n / seconds / workers:.0f} per worker), {in_bytes / 1e6 / seconds:.1f} MB/s read, "
                f"{out_bytes / 1e6 / seconds:.1f} MB/s written"
            )
            if args.parts:
                single = manifest["counts"]["inputs"] / seconds
                rows = run_parts(tsv, tmp / f"parts-w{workers}", workers, args.parts)
                for i, (inputs, part_seconds) in enumerate(rows):
                    rate = inputs / part_seconds
                    print(
                        f"workers={workers}: part {i}/{args.parts}: {inputs} inputs in {part_seconds:.2f} s "
                        f"= {rate:.0f} samples/s ({rate / single:.2f}x the single build's {single:.0f})"
                    )
                serial = sum(s for _, s in rows)
                print(
                    f"workers={workers}: the {args.parts} parts one after another: {serial:.2f} s "
                    f"({serial / seconds:.2f}x the single build's {seconds:.2f} s; on {args.parts} machines "
                    f"the slowest part, {max(s for _, s in rows):.2f} s, plus the merge)"
                )
        identical = len(set(digests.values())) == 1
        print(f"shards byte-identical across worker counts: {identical}")
        if args.merge_samples:
            merge_per_1000_shards(tmp / "merge", args.merge_samples)
        if args.annotation_records:
            annotation_passes(tmp / "raw", args.annotation_records)
        return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
