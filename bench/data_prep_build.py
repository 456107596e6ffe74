"""Benchmark (not a test): data_prep build throughput on 512x512 JPEG inputs, 1 and 2 workers.

    python bench/data_prep_build.py [--num 2000] [--workers 1 2] [--energon]

Writes photo-like 512x512 JPEGs (smooth gradients plus noise, ~quality 90) and a caption TSV to
a temporary directory, builds each worker count through the real CLI code path (progress bar
off, Energon indexing off unless --energon, as it is a fixed cost per build rather than per
sample) and prints samples/s and MB/s (input JPEG bytes read, shard bytes written). Also checks
that every worker count produced byte-identical shards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.build import BuildOptions, run_build  # noqa: E402
from data_prep.images import ImageOptions  # noqa: E402
from data_prep.sources import SourceOptions, entries_for  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--energon", action="store_true", help="include `energon prepare` in the timing")
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
        identical = len(set(digests.values())) == 1
        print(f"shards byte-identical across worker counts: {identical}")
        return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
