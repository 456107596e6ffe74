"""The build: entries -> (worker pool) -> ordered shards, rejects, manifest, Energon metadata.

Order is the input order whatever the worker count: work is submitted in chunks with a bounded
window and results are consumed in submission order, so shard boundaries and bytes do not
depend on scheduling. Memory stays bounded (no eager queueing of a 300M-record stream).
A build may also be one part of several (data_prep.parts): a slice of the inputs, merged later.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.energon_prepare import energon_prepare
from data_prep.images import ImageOptions
from data_prep.manifest import (
    MANIFEST_NAME,
    REJECTS_NAME,
    BuildStats,
    file_digest,
    make_manifest,
    write_json_atomic,
)
from data_prep.output_dir import prepare_output
from data_prep.parts import PartSlice
from data_prep.process import ProcessConfig, Written, init_worker, process_chunk, process_item
from data_prep.progress import INTERVAL_S, Progress
from data_prep.records import Item, Rejected
from data_prep.rejects import RejectLog
from data_prep.shards import ShardWriter
from data_prep.sources import SourceError

Entry = Item | Rejected
VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildOptions:
    """Build options. ``recorded()`` is what decides the output and goes into the manifest; the
    rest (workers, overwrite, progress, chunking, energon) only decides how the work runs."""

    image: ImageOptions = ImageOptions()
    image_root: str | None = None
    tokenizer: str | None = None
    shard_prefix: str = "shard"
    shard_max_samples: int = 10_000
    shard_max_bytes: int = 1 << 30
    workers: int = 1
    overwrite: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal, else a line every interval
    progress_interval: float = INTERVAL_S
    energon: bool = True
    chunk_size: int = 8

    def recorded(self) -> dict[str, Any]:
        tokenizer = None
        if self.tokenizer:
            digest = file_digest(Path(self.tokenizer) / "tokenizer.json")
            tokenizer = {"dir": Path(self.tokenizer).name, "tokenizer_json_sha256": digest["sha256"]}
        return {
            "data_prep_version": VERSION,
            "image": dataclasses.asdict(self.image),
            "image_root": self.image_root,
            "tokenizer": tokenizer,
            "shard_prefix": self.shard_prefix,
            "shard_max_samples": self.shard_max_samples,
            "shard_max_bytes": self.shard_max_bytes,
        }


def build_record(source: dict[str, Any], options: BuildOptions) -> dict[str, Any]:
    """The manifest's ``build`` section: what went in and every option that decides the output."""
    return {**source, **options.recorded()}


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    seconds: float
    summary: str
    kept: list[str] = dataclasses.field(default_factory=list)  # user entries left in the output (tokenizer/)


def dedupe_keys(entries: Iterable[Entry]) -> Iterator[Entry]:
    """The first input to claim a key keeps it; later ones are rejected as duplicates."""
    first_by_key: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry, Item):
            first = first_by_key.get(entry.key)
            if first is not None:
                yield Rejected(
                    entry.index,
                    entry.source,
                    entry.id,
                    "duplicate_key",
                    f"key {entry.key!r} (id {entry.id!r}) is already used by input #{first}",
                    entry.record,
                )
                continue
            first_by_key[entry.key] = entry.index
        yield entry


def _chunks(entries: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    chunk: list[Entry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def processed(
    entries: Iterable[Entry], config: ProcessConfig, workers: int, chunk_size: int
) -> Iterator[Written | Rejected]:
    """Results in input order. ``workers == 1`` runs in this process (no pool, easy to debug).

    Workers are *spawned*, so a script that calls this with workers > 1 needs the usual
    ``if __name__ == "__main__":`` guard (``python -m data_prep`` has it).
    """
    if workers <= 1:
        init_worker(config)
        for entry in entries:
            yield process_item(entry)
        return
    # spawn: children start clean (no inherited threads from tokenizers/torch, no fork hazards).
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(config,),
    )
    try:
        window: deque = deque()
        for chunk in _chunks(entries, chunk_size):
            window.append(pool.submit(process_chunk, chunk))
            while len(window) >= 4 * workers:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def counts_text(manifest: dict[str, Any]) -> str:
    """``N inputs = W written + R rejected (reason n, ...)``: a manifest's account in one phrase."""
    counts = manifest["counts"]
    reasons = sorted(((n, code) for code, n in manifest["rejects"].items() if n), reverse=True)
    why = (
        f" ({', '.join(f'{code} {n}' for n, code in reasons[:4])}{', ...' if len(reasons) > 4 else ''})"
        if reasons
        else ""
    )
    return f"{counts['inputs']} inputs = {counts['written']} written + {counts['rejected']} rejected{why}"


def _summary(output: Path, manifest: dict[str, Any], seconds: float, label: str = "data_prep") -> str:
    counts = manifest["counts"]
    out_mb = manifest["total_bytes"] / 1e6
    in_mb = counts["input_image_bytes"] / 1e6
    rate = counts["inputs"] / seconds if seconds > 0 else 0.0
    return (
        f"{label}: {counts_text(manifest)}; "
        f"{len(manifest['shards'])} shard(s), {out_mb:.1f} MB in {seconds:.1f} s "
        f"({rate:.0f} samples/s, {in_mb / seconds if seconds > 0 else 0:.1f} MB/s read, "
        f"{out_mb / seconds if seconds > 0 else 0:.1f} MB/s written) -> {output}"
    )


def run_build(
    entries: Iterable[Entry],
    output: Path,
    options: BuildOptions,
    source: dict[str, Any],
    total: int | None = None,
    describe: str = "build",
    prepared: bool = False,
    part: PartSlice | None = None,
) -> BuildResult:
    """Run a whole build into ``output`` (which must be new, empty, or an old build with overwrite).

    ``source`` describes the inputs for the manifest (files and their digests, or the synthetic
    generator's parameters). ``prepared``: the caller already ran prepare_output (and may have put
    owned files such as tokenizer/ there). Otherwise a user's tokenizer/ in ``output`` is kept (see
    data_prep.output_dir). Returns the manifest, the wall time, the summary and what was kept.

    ``part``: build only that slice of ``entries`` (all of them, from the first: the keys before
    the slice are still claimed), with a part manifest and no Energon metadata (data_prep.parts).
    """
    output = Path(output)
    start = time.perf_counter()
    kept = [] if prepared else prepare_output(output, options.overwrite)
    config = ProcessConfig(image=options.image, image_root=options.image_root, tokenizer=options.tokenizer)
    recorded = build_record(source, options)
    stats = BuildStats()
    writer = ShardWriter(output, options.shard_prefix, options.shard_max_samples, options.shard_max_bytes)
    rejects_partial = output / f".{REJECTS_NAME}.partial"
    expected = 0
    if part is not None:
        total, expected = part.end - part.first, part.first
    try:
        with (
            open(rejects_partial, "w", encoding="ascii") as rejects_file,
            Progress(describe, total, options.progress, options.progress_interval) as progress,
        ):
            log = RejectLog(rejects_file)
            work = dedupe_keys(entries)
            if part is not None:
                work = part.select(work, progress.reading)
            for result in processed(work, config, options.workers, options.chunk_size):
                if result.index != expected:
                    raise AssertionError(
                        f"results out of order: got input #{result.index}, expected #{expected}"
                    )
                expected += 1
                if isinstance(result, Rejected):
                    log.add(
                        result.index, result.id, result.source, result.code, result.message, result.record
                    )
                    stats.add_rejected()
                    progress.update(rejected=True)
                else:
                    writer.write(result.key, result.members)
                    stats.add_written(
                        result.kind,
                        result.image_tokens,
                        result.text_tokens,
                        result.text_chars,
                        result.input_bytes,
                        result.tag_inserted,
                    )
                    progress.update(rejected=False)
            if part is not None and expected != part.end:
                raise SourceError(
                    f"the annotations ended at input #{expected}, before this part's end #{part.end} "
                    f"({part.total} inputs when counted): did they change during the build?"
                )
            rejects_file.flush()
            os.fsync(rejects_file.fileno())
        shards = writer.close()
    except BaseException:
        writer.abort()
        rejects_partial.unlink(missing_ok=True)
        raise
    os.replace(rejects_partial, output / REJECTS_NAME)
    manifest = make_manifest(
        build=recorded,
        stats=stats,
        reject_counts=log.counts,
        shards=[s.to_json() for s in shards],
        image_extension=options.image.extension,
    )
    if part is not None:
        manifest["part"] = part.to_json(stats)
    elif options.energon and shards:
        energon_prepare(output, len(shards))
    write_json_atomic(output / MANIFEST_NAME, manifest)  # last: its presence means "complete"
    seconds = time.perf_counter() - start
    label = "data_prep"
    if part is not None:
        label = f"data_prep {part.label} (inputs [{part.first}, {part.end}) of {part.total})"
    return BuildResult(manifest, seconds, _summary(output, manifest, seconds, label), kept)
