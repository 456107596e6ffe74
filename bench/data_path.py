"""Data path benchmark: shard build, our loader, and the reference-style loose-file loader.

One data set serves all three, built in a temporary directory:

1. Inputs: photo-like JPEGs (bench/data_prep_build.py's ``make_inputs``), each used several times
   as crops of 256x256 .. 512x512 pixels (64..256 image tokens) with captions of 5..60 words, so
   documents differ in length as mixed real data does.
2. Shard build: the real data_prep build path (``data_prep_build.run``) at 1 worker (in-process)
   and 2 workers (a spawned pool; its start-up, measured as a 2-sample build, is subtracted),
   interleaved; samples/s per worker.
3. Loader: ``pretrain.data.NeoDataLoader`` over those shards with ONE worker process: Energon read,
   cook, chat template + tokenize, first-fit-decreasing packing, JPEG decode, normalise, patchify,
   collate into ``NeoBatch`` rows of ``SEQ_LEN`` tokens. samples/s and pack fill.
4. Baseline, interleaved with 3: the same samples (the same JPEG bytes and sample JSON, exported
   from the shards) as loose files + one JSON annotation list, read by a plain
   ``torch.utils.data.Dataset`` / ``DataLoader`` with ONE worker, one sample per item as the
   reference NEO training does: open + read the file, decode, normalise, patchify, the same
   template + tokenize, then pad the batch to its longest sample. Its "fill" is real tokens over
   padded tokens.

Files are in the page cache on this machine, so the baseline's per-file cost here is a syscall,
not the metadata round trip of a cluster file system: the comparison favours the baseline.

    python -m bench.data_path [--quick]
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from bench.results import Result
from bench.timing import interleaved

SEQ_LEN = 2048
CROPS = ((512, 512), (256, 256), (384, 512), (256, 512), (512, 320), (320, 320))  # (h, w), multiples of 32
WORDS = ("a photo of the bright red green blue small large old new wooden metal house tree river "
         "street car dog cat person table window mountain sky cloud field road boat bridge with and "
         "near under behind next to in on at evening morning light shadow").split()


# ------------------------------------------------------------------------------------ inputs


def make_dataset(root: Path, images: int, copies: int, seed: int = 0) -> Path:
    """``images`` photo-like JPEGs from ``make_inputs``, each used ``copies`` times as a crop of a
    different size (256x256 up to 512x512: 64..256 image tokens, as mixed real data has) with its
    own caption of 5..60 words; every row is its own sample. Returns the caption TSV."""
    from PIL import Image

    from bench.data_prep_build import make_inputs

    tsv = make_inputs(root, images, seed)
    rng = random.Random(seed)
    lines = tsv.read_text(encoding="utf-8").splitlines()
    rows = [lines[0]]
    for copy in range(copies):
        for i, line in enumerate(lines[1:]):
            image = line.split("\t", 1)[0]
            h, w = CROPS[(i + copy) % len(CROPS)]
            if (h, w) != (512, 512):
                crop = root / f"{image.removesuffix('.jpg')}-{h}x{w}.jpg"
                if not crop.exists():
                    Image.open(root / image).crop((0, 0, w, h)).save(crop, quality=90)
                image = crop.relative_to(root).as_posix()
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
            rows.append(f"{image}\t{' '.join(words).capitalize()}.")
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tsv


def head_tsv(tsv: Path, rows: int, out: Path) -> Path:
    lines = tsv.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return out


def build_tokenizer(tsv: Path, out: Path) -> Path:
    from data_prep.tokenizer import train_tokenizer

    captions = [line.split("\t", 1)[1] for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    return train_tokenizer(captions, out, vocab_size=512)


def export_loose(shards: Path, out: Path) -> Path:
    """Every shard sample as loose files: images/<key>.img<i>.jpg + annotations.json (a list of
    the sample JSONs, each with the relative paths of its images under "image_files")."""
    images = out / "images"
    images.mkdir(parents=True)
    samples: dict[str, dict] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = samples.setdefault(key, {"image_files": []})
                if suffix == "json":
                    entry["meta"] = json.loads(data)
                else:
                    (images / member.name).write_bytes(data)
                    entry["image_files"].append(f"images/{member.name}")
    annotations = [{**v["meta"], "image_files": sorted(v["image_files"])} for v in samples.values()]
    path = out / "annotations.json"
    path.write_text(json.dumps(annotations))
    return path


# ------------------------------------------------------------------------------- baseline


class LooseFileDataset(torch.utils.data.Dataset):
    """The reference's way: a JSON list in memory, one image file opened per sample."""

    def __init__(self, annotations: Path, tokenizer_dir: Path):
        from pretrain.data.template import ChatTemplate, load_tokenizer

        self.root = annotations.parent
        self.items = json.loads(annotations.read_text())
        self.template = ChatTemplate(load_tokenizer(tokenizer_dir))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from pretrain.data.images import decode_image, image_patches

        meta = self.items[i]
        patches = []
        for rel, entry in zip(meta["image_files"], meta["images"], strict=True):
            image = decode_image((self.root / rel).read_bytes(), entry["size"])
            patches.append(image_patches(image, entry["grid"]))
        r = self.template.render(meta)
        return {
            "tokens": torch.from_numpy(r.tokens),
            "labels": torch.from_numpy(r.labels(self.template.pad_id)),
            "loss_mask": torch.from_numpy(r.loss_mask()),
            "image_grids": torch.from_numpy(r.image_grids),
            "patches": torch.cat(patches) if patches else torch.zeros(0, 768),
        }


def pad_collate(items: list[dict], pad_id: int = 0) -> dict:
    """Pad to the longest sample of the batch (the reference's collator)."""
    n = max(len(it["tokens"]) for it in items)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(it[key], (0, n - len(it[key])), value=value) for it in items])

    return {
        "tokens": pad("tokens", pad_id),
        "labels": pad("labels", pad_id),
        "loss_mask": pad("loss_mask", False),
        "attention_mask": torch.stack([torch.arange(n) < len(it["tokens"]) for it in items]),
        "image_grids": torch.cat([it["image_grids"] for it in items]),
        "patches": torch.cat([it["patches"] for it in items]),
    }


# ----------------------------------------------------------------------------- measurements


class Window:
    """Throughput of an iterator after a warm-up: samples/s and fill over ``min_samples``."""

    def __init__(self):
        self.rates: list[float] = []
        self.fills: list[float] = []


def _time_ours(shards: Path, tokenizer: Path, warmup_batches: int, min_samples: int, window: Window) -> None:
    from pretrain.data import LoaderConfig, NeoDataLoader

    loader = NeoDataLoader(LoaderConfig(path=str(shards), tokenizer=str(tokenizer), seq_len=SEQ_LEN,
                                        micro_batch_size=1, num_workers=1, seed=len(window.rates)))
    try:
        for _ in range(warmup_batches):  # worker start, first packing buffer
            next(loader)
        loader.interval_stats()
        start = loader.totals.samples
        t0 = time.perf_counter()
        while loader.totals.samples - start < min_samples:
            next(loader)
        elapsed = time.perf_counter() - t0
        stats = loader.interval_stats()
    finally:
        loader.close()
    window.rates.append(stats.samples / elapsed)
    window.fills.append(stats.fill)


def _time_baseline(annotations: Path, tokenizer: Path, batch_size: int, warmup_batches: int, min_samples: int,
                   window: Window) -> None:
    dataset = LooseFileDataset(annotations, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=1,
                                         collate_fn=pad_collate, persistent_workers=False,
                                         generator=torch.Generator().manual_seed(len(window.rates)))
    iterator = iter(loader)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        t0 = time.perf_counter()
        samples = real = padded = 0
        while samples < min_samples:
            try:
                batch = next(iterator)
            except StopIteration:  # one epoch is over: carry on (the reference repeats epochs)
                iterator = iter(loader)
                continue
            samples += batch["tokens"].shape[0]
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
        elapsed = time.perf_counter() - t0
    finally:
        del iterator
    window.rates.append(samples / elapsed)
    window.fills.append(real / padded)


def run(quick: bool = False, keep: Path | None = None) -> list[Result]:
    from bench.data_prep_build import run as build

    images, copies = (16, 2) if quick else (60, 4)
    num = images * copies
    rounds = 1 if quick else 3
    results: list[Result] = []
    tmp = Path(tempfile.mkdtemp(prefix="neo-bench-data-"))
    try:
        tsv = make_dataset(tmp / "raw", images, copies)
        tiny_tsv = head_tsv(tsv, 2, tmp / "raw" / "two.tsv")

        # Shard build at 1 and 2 workers, interleaved, plus a 2-sample build at 2 workers: the pool's
        # start-up (spawned processes importing data_prep), which a long build pays once.
        builds: dict[str, list] = {"w1": [], "w2": [], "w2-startup": []}
        counter = iter(range(1000))

        def build_with(label: str, source: Path, workers: int):
            def call():
                out = tmp / f"shards-{label}-{next(counter)}"
                seconds, manifest = build(source, out, workers, energon=False)
                builds[label].append((seconds, manifest["counts"]["written"], out))
            return call

        interleaved({"w1": build_with("w1", tsv, 1), "w2": build_with("w2", tsv, 2),
                     "w2-startup": build_with("w2-startup", tiny_tsv, 2)}, repeats=rounds, warmup=0)
        w1 = statistics.median(n / t for t, n, _ in builds["w1"])
        w2_total = statistics.median(t for t, _, _ in builds["w2"])
        startup = statistics.median(t for t, _, _ in builds["w2-startup"])
        w2 = (num - 2) / max(w2_total - startup, 1e-9)
        common = (f"{num} samples (JPEG of 256x256..512x512 + caption) -> validated, re-encoded shards through the data_prep "
                  f"build path (bench/data_prep_build.py), energon indexing excluded; medians of {rounds} interleaved "
                  f"builds; {_cpus()} CPUs")
        results.append(Result(name="data/shard build, 1 worker", value=w1, unit="samples/s per worker",
                              notes=f"{common}; in-process worker"))
        results.append(Result(
            name="data/shard build, 2 workers", value=w2 / 2, unit="samples/s per worker",
            baseline_value=w1,
            notes=(f"{common}; steady state: the pool's start-up ({startup:.1f} s, measured as a 2-sample build) is "
                   f"subtracted; with it {num / w2_total:.1f} samples/s in total. Baseline: 1 worker (ratio = "
                   f"scaling efficiency per core)"),
        ))
        shards = builds["w1"][-1][2]
        for _, _, out in builds["w1"][:-1] + builds["w2"] + builds["w2-startup"]:
            shutil.rmtree(out, ignore_errors=True)
        from data_prep.energon_prepare import energon_prepare

        energon_prepare(shards, len(list(shards.glob("*.tar"))))
        tokenizer = build_tokenizer(tsv, tmp / "tokenizer")
        annotations = export_loose(shards, tmp / "loose")

        ours, base = Window(), Window()
        min_samples = 24 if quick else 120
        interleaved({
            "ours": lambda: _time_ours(shards, tokenizer, 2, min_samples, ours),
            "baseline": lambda: _time_baseline(annotations, tokenizer, 4, 2, min_samples, base),
        }, repeats=1 if quick else 5, warmup=0)
        rate, base_rate = statistics.median(ours.rates), statistics.median(base.rates)
        per_round = statistics.median(a / b for a, b in zip(ours.rates, base.rates, strict=True))
        results.append(Result(
            name="data/loader decode+tokenize+pack, 1 worker", value=rate, unit="samples/s per worker",
            baseline_value=base_rate,
            notes=(f"NeoDataLoader (Energon, seq_len {SEQ_LEN}, packing) vs loose JPEG files + JSON list with a "
                   f"plain torch Dataset/DataLoader (same bytes, same decode + template + tokenize, padded batches "
                   f"of 4); 1 worker process each; medians of {len(ours.rates)} interleaved windows of "
                   f">= {min_samples} samples after warm-up (median of per-round ratios {per_round:.2f})"),
        ))
        results.append(Result(
            name="data/pack fill", value=statistics.median(ours.fills), unit="real tokens / row tokens",
            baseline_value=statistics.median(base.fills),
            notes=(f"ours: first-fit-decreasing packing into {SEQ_LEN}-token rows; baseline: padding to the "
                   "longest sample of each batch of 4 (images of 64..256 tokens, captions of 5..60 words)"),
        ))
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.move(str(tmp), str(keep))
    return results


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> int:
    from bench.results import section_main

    return section_main(run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
