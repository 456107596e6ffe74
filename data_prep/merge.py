"""`merge OUTPUT`: the parts of a build (data_prep.parts) become one data set, the single build's.

The parts are checked first, before anything in OUTPUT changes: all N there, each complete (its
manifest written, its shards at their recorded sizes), all of the same build (options, inputs'
sha256, environment, N), their slices contiguous over [0, T). Any problem is one line naming the
part. Then OUTPUT gets the shards in global order under the usual names (hard links to the
parts' files, a copy where the file system has none; not re-hashed: the parts' manifests hold
their sha256), one rejects.jsonl (the parts' in order), Energon metadata, and last manifest.json,
made by make_manifest from the parts' summed raw statistics, so that everything in it but the
shard list (part boundaries end shards early) equals a single build's. Then parts/ goes.

The merged set is assembled in ``OUTPUT/.merge.partial/`` and moved up: `energon prepare` indexes
every tar below the directory it is given, parts/ included. Until manifest.json is written the
parts are untouched, so a merge that dies anywhere is simply run again: what data_prep wrote in
an OUTPUT without manifest.json (that merge's leftovers, or the data set that part builds given
--overwrite are replacing) is removed; a user's tokenizer/ stays. A complete data set there is
replaced only with --overwrite (or left as it is when these parts make exactly it: a merge that
died before removing parts/).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.build import counts_text
from data_prep.energon_prepare import energon_prepare
from data_prep.manifest import (
    MANIFEST_NAME,
    REJECTS_NAME,
    BuildStats,
    ManifestError,
    as_written,
    load_manifest,
    make_manifest,
    write_json_atomic,
)
from data_prep.output_dir import USER_FILES, OutputDirError, prepare_output
from data_prep.parts import PARTS_DIR, identity, inspect_part, mismatch, part_name
from data_prep.shards import SHARD_PATTERN

STAGING = ".merge.partial"
TRASH = ".parts.partial"  # parts/ once merged, while it is being removed
_PART_DIR = re.compile(r"^part-([0-9]{5})$")
_PART_LOCK = re.compile(r"^\.part-[0-9]{5}\.lock$")
# os.link failures that mean "no hard links here" (network and FUSE file systems, link limits,
# fs.protected_hardlinks): copy instead.
_NO_LINKS = {
    errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS
}


class MergeError(Exception):
    """The parts cannot be merged (message: one line naming the part and what is wrong)."""


@dataclass
class MergeResult:
    manifest: dict[str, Any]
    seconds: float
    summary: str
    kept: list[str] = field(default_factory=list)  # user entries left in OUTPUT (tokenizer/)


def check_parts(output: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of every part, in order, once all of them can be merged."""
    root = Path(output) / PARTS_DIR
    if not root.is_dir():
        raise MergeError(f"{root} not found: nothing to merge (build the parts with --parts N --part I)")
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir()):
        if _PART_LOCK.match(path.name) and path.is_file():
            continue  # a part build's lock file (data_prep.parts.part_lock)
        m = _PART_DIR.match(path.name)
        if m is None or not path.is_dir():
            raise MergeError(f"{path}: not a part directory (part-IIIII); remove it")
        found[int(m.group(1))] = path
    if not found:
        raise MergeError(f"{root} holds no parts (build them with --parts N --part I)")
    states = {i: inspect_part(path) for i, path in found.items()}
    complete = [(i, manifest) for i, (manifest, _) in states.items() if manifest is not None]
    if not complete:
        first = min(found)
        raise MergeError(f"part {first} ({found[first]}): {states[first][1]}; build it again")
    ref_index, ref = complete[0]
    n, total = ref["part"]["parts"], ref["part"]["total_inputs"]
    parts = []
    end = 0
    for i in range(n):
        where = f"part {i}/{n} ({root / part_name(i)})"
        again = f"build it again with --parts {n} --part {i}"
        if i not in found:
            raise MergeError(f"{where}: missing; {again}")
        manifest, problem = states[i]
        if manifest is None:
            raise MergeError(f"{where}: {problem}; {again}")
        wrong = mismatch(identity(manifest), identity(ref), f"part {i}", f"part {ref_index}")
        if wrong is not None:
            raise MergeError(
                f"{where}: built with {wrong}; build every part with the same inputs and options "
                "(--overwrite replaces a part)"
            )
        part = manifest["part"]
        if part["index"] != i:
            raise MergeError(f"{where}: its manifest says it is part {part['index']}; {again}")
        if part["total_inputs"] != total or part["first_input"] != end:
            raise MergeError(
                f"{where}: covers inputs [{part['first_input']}, {part['end_input']}) of "
                f"{part['total_inputs']}, expected [{end}, ...) of {total}; {again}"
            )
        end = part["end_input"]
        parts.append((found[i], manifest))
    extra = sorted(set(found) - set(range(n)))
    if extra:
        raise MergeError(f"part {extra[0]} ({found[extra[0]]}): not one of the {n} parts; remove it")
    if end != total:
        raise MergeError(f"part {n - 1}/{n}: the parts end at input {end}, not at {total}")
    return parts


def merged_manifest(
    parts: list[tuple[Path, dict[str, Any]]],
) -> tuple[dict[str, Any], list[tuple[Path, str, int]]]:
    """The data set's manifest, and (part shard, merged name, bytes) for each shard in order."""
    first = parts[0][1]
    prefix = first["build"]["shard_prefix"]
    stats = BuildStats()
    rejects: Counter[str] = Counter()
    shards: list[dict[str, Any]] = []
    files: list[tuple[Path, str, int]] = []
    for directory, manifest in parts:
        stats.update(BuildStats.from_raw(manifest["part"]["stats_raw"]))
        rejects.update(manifest["rejects"])
        for shard in manifest["shards"]:
            name = SHARD_PATTERN.format(prefix=prefix, index=len(shards))
            shards.append({**shard, "name": name})
            files.append((directory / shard["name"], name, shard["bytes"]))
    manifest = make_manifest(
        build=first["build"],
        stats=stats,
        reject_counts=dict(rejects),
        shards=shards,
        image_extension=first["image_extension"],
        env=first["environment"],
    )
    return manifest, files


def _place(source: Path, target: Path, size: int) -> bool:
    """Hard-link ``source`` as ``target`` (else copy it); True when linked. Checks the size."""
    try:
        os.link(source, target)
        linked = True
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        with open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        linked = False
    got = target.stat().st_size
    if got != size:
        raise MergeError(
            f"{source}: {got} bytes, its part manifest says {size} (truncated or edited); "
            "build the part again"
        )
    return linked


def _concatenate_rejects(parts: list[tuple[Path, dict[str, Any]]], target: Path) -> None:
    """The parts' rejects.jsonl in order (input order: the slices are), each checked against its count."""
    with open(target, "wb") as out:
        for directory, manifest in parts:
            lines = 0
            with open(directory / REJECTS_NAME, "rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
                    lines += block.count(b"\n")
            if lines != manifest["counts"]["rejected"]:
                raise MergeError(
                    f"{directory / REJECTS_NAME}: {lines} lines, its manifest says "
                    f"{manifest['counts']['rejected']} rejects; build the part again"
                )
        out.flush()
        os.fsync(out.fileno())


def _remove_parts(output: Path) -> str:
    """Remove parts/ (merged), renamed first so that a removal cut short leaves no parts/ that a
    rerun would take for unmerged parts. Returns a note for the summary ("" when all went)."""
    trash = output / TRASH
    if (output / PARTS_DIR).exists():
        os.replace(output / PARTS_DIR, trash)
    try:
        if trash.exists():
            shutil.rmtree(trash)
    except OSError as exc:
        return f"; could not remove {trash} ({exc.strerror or exc}): remove it, or run the merge again"
    return ""


def merge(output: Path, energon: bool = True, overwrite: bool = False) -> MergeResult:
    """Merge ``OUTPUT/parts/*`` into ``OUTPUT`` (see the module docstring)."""
    start = time.perf_counter()
    output = Path(output)
    root = output / PARTS_DIR
    existing = output / MANIFEST_NAME
    if not root.exists() and existing.is_file():
        manifest = load_manifest(output)
        leftover = f", removed {output / TRASH}" if (output / TRASH).exists() else ""
        note = _remove_parts(output)
        done = leftover or "; nothing to do"
        summary = f"data_prep merge: {output} is already merged (no parts/){done}{note}"
        return MergeResult(manifest, 0.0, summary)
    parts = check_parts(output)
    manifest, files = merged_manifest(parts)
    summary = (
        f"data_prep merge: {len(parts)} parts, {counts_text(manifest)}; "
        f"{len(files)} shard(s), {manifest['total_bytes'] / 1e6:.1f} MB"
    )
    if existing.is_file():
        try:
            same = load_manifest(output) == as_written(manifest)
        except ManifestError:
            same = False
        if same:  # a merge that died after writing manifest.json: only parts/ was left to remove
            note = _remove_parts(output)
            seconds = time.perf_counter() - start
            return MergeResult(
                manifest, seconds, f"{summary}; already merged, removed {root}{note} -> {output}"
            )
        if not overwrite:
            raise OutputDirError(
                f"{output} already holds a data set ({MANIFEST_NAME}) other than these parts make; "
                "pass --overwrite to replace it"
            )
        existing.unlink()  # first: OUTPUT must not look complete while it is being replaced
    kept = prepare_output(output, overwrite=True, keep=(*USER_FILES, PARTS_DIR))  # leftovers go
    kept = [name for name in kept if name != PARTS_DIR]
    staging = output / STAGING
    staging.mkdir()
    linked = sum(_place(source, staging / name, size) for source, name, size in files)
    _concatenate_rejects(parts, staging / REJECTS_NAME)
    if energon and files:
        energon_prepare(staging, len(files))
    for entry in sorted(staging.iterdir()):
        os.replace(entry, output / entry.name)
    staging.rmdir()
    write_json_atomic(existing, manifest)  # last: its presence means "complete"
    note = _remove_parts(output)
    seconds = time.perf_counter() - start
    how = "hard links" if linked == len(files) else f"{len(files) - linked} copied (no hard links here)"
    return MergeResult(manifest, seconds, f"{summary} ({how}) in {seconds:.1f} s -> {output}{note}", kept)
