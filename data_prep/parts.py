"""One build spread over N independent parts (e.g. a SLURM job array), later made one data set
by ``data_prep.merge``.

Part I of N builds the inputs whose global index lies in [I*T//N, (I+1)*T//N), T being the number
of inputs (a counting pass, sources.count_inputs). The slices are contiguous, never overlap and
cover every input, so the parts concatenated in order are the single build's samples in its
order. Each part still streams the inputs before its slice through ``dedupe_keys`` (no image
work), so a key first used in part 0 rejects its duplicate in part 2 exactly as one build would.

A part writes ``OUTPUT/parts/part-IIIII/``: its shards, ``rejects.jsonl`` (global input indices)
and, last, ``manifest.json``: the normal manifest plus a ``part`` section (the slice, and the raw
statistics the merge sums, since percentiles cannot be merged from summaries). No Energon
metadata: the merge prepares it once. Parts write concurrently, so they never touch ``OUTPUT``
beyond creating it and ``parts/`` (and, given --overwrite, removing a merged data set's
manifest.json, so that it stops looking complete).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.manifest import (
    MANIFEST_NAME,
    REJECTS_NAME,
    BuildStats,
    ManifestError,
    as_written,
    environment,
    load_manifest,
)
from data_prep.output_dir import OutputDirError, prepare_output
from data_prep.records import Item, Rejected
from data_prep.verify import manifest_problem

PARTS_DIR = "parts"
PART_FIELDS = ("index", "parts", "first_input", "end_input", "total_inputs")
MAX_PARTS = 100_000  # part-IIIII
_READING_EVERY = 1 << 16  # inputs between two progress notes while reading ahead to a slice


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def part_dir(output: Path, index: int) -> Path:
    return Path(output) / PARTS_DIR / part_name(index)


class PartBusyError(Exception):
    """Another process is building this part right now (a failure to retry, not a usage error)."""


def _make_dirs(directory: Path) -> Path:
    """``directory`` and its parents, race-free (parts start together); one line if it cannot be."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(
            f"cannot create {directory} ({exc.strerror or exc}); choose a directory you can write to"
        ) from None
    return directory


def lock_name(index: int) -> str:
    return f".{part_name(index)}.lock"


@contextlib.contextmanager
def part_lock(output: Path, index: int, parts: int, overwrite: bool = False) -> Iterator[None]:
    """Hold ``OUTPUT/parts/.part-IIIII.lock`` while part ``index`` is built: a second build of the
    same part at the same time (the same task submitted twice, a by-hand run next to a job) is
    refused instead of both writing one directory. Where the file system has no locks (some NFS
    mounts) the build goes on unlocked."""
    unmerge(output, overwrite)  # before parts/ appears in a merged data set
    root = _make_dirs(Path(output) / PARTS_DIR)
    with open(root / lock_name(index), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PartBusyError(
                f"part {index}/{parts} is being built right now by another process ({root / lock_name(index)} "
                "is locked); wait for it to finish, or stop it"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield  # the lock goes with the file's closing


def check_part_args(parts: int | None, part: int | None) -> None:
    """--parts N and --part I come together, with 0 <= I < N (ValueError: a usage error)."""
    if (parts is None) != (part is None):
        raise ValueError("--parts N and --part I go together (build the I-th of N slices, 0 <= I < N)")
    if parts is None:
        return
    if not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"--parts must be an integer in 1..{MAX_PARTS}, got {parts}")
    if not 0 <= part < parts:
        raise ValueError(f"--part must be in 0..{parts - 1} for --parts {parts}, got {part}")


@dataclass(frozen=True)
class PartSlice:
    """Part ``index`` of ``parts`` of a build of ``total`` inputs."""

    index: int
    parts: int
    total: int

    @property
    def first(self) -> int:
        return self.index * self.total // self.parts

    @property
    def end(self) -> int:
        return (self.index + 1) * self.total // self.parts

    @property
    def label(self) -> str:
        return f"part {self.index}/{self.parts}"

    def select(
        self, entries: Iterable[Item | Rejected], reading: Callable[[int, int], None] | None = None
    ) -> Iterator[Item | Rejected]:
        """This slice's entries out of all entries in input order, already through dedupe_keys
        (which must see the inputs before the slice). Stops reading at the slice's end; calls
        ``reading(index, first)`` now and then while still before the slice."""
        for entry in entries:
            if entry.index >= self.end:
                return
            if entry.index >= self.first:
                yield entry
            elif reading is not None and entry.index % _READING_EVERY == 0:
                reading(entry.index, self.first)

    def to_json(self, stats: BuildStats) -> dict[str, Any]:
        """The manifest's ``part`` section."""
        return {
            "index": self.index,
            "parts": self.parts,
            "first_input": self.first,
            "end_input": self.end,
            "total_inputs": self.total,
            "stats_raw": stats.to_raw(),
        }


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What parts of one build share: inputs and options (``build``), environment and N."""
    return {
        "build": manifest["build"],
        "environment": manifest["environment"],
        "parts": manifest["part"]["parts"],
    }


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _differing(a: Any, b: Any, name: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{name}.{key}" if name else str(key)
            out.extend(_differing(a.get(key), b.get(key), sub))
        return out
    return [] if a == b else [(name, a, b)]


def mismatch(ours: dict[str, Any], theirs: dict[str, Any], our_name: str, their_name: str) -> str | None:
    """How identity ``ours`` differs from ``theirs`` (see ``identity``), in words naming the
    differing keys and both values; None when they are the same build."""
    diffs = _differing(ours, theirs)
    if not diffs:
        return None

    def files(value: Any) -> str:
        entries = [f for f in value if isinstance(f, dict)] if isinstance(value, list) else []
        return "[" + ", ".join(f"{f.get('name')} sha256 {str(f.get('sha256'))[:12]}" for f in entries) + "]"

    groups: dict[str, list[str]] = {}
    for name, a, b in diffs:
        if name == "parts":
            return f"another number of parts ({a} in {our_name}, {b} in {their_name})"
        if name.startswith("build.annotations"):
            a, b = ours["build"].get("annotations"), theirs["build"].get("annotations")
            return f"other inputs ({files(a)} in {our_name}, {files(b)} in {their_name})"
        what = "another environment" if name.startswith("environment.") else "other options"
        key = name.removeprefix("build.")
        groups.setdefault(what, []).append(f"{key}: {_short(a)} in {our_name}, {_short(b)} in {their_name}")
    return "; ".join(f"{what} ({'; '.join(items)})" for what, items in sorted(groups.items(), reverse=True))


def inspect_part(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(part manifest, None) when ``directory`` holds a complete part, else (None, what is wrong).

    Complete: manifest.json (written last) reads as a part manifest whose counts add up, and its
    shards and rejects.jsonl are there with the recorded sizes (a stat each; sha256 are trusted)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None, "missing"
    if not (directory / MANIFEST_NAME).is_file():
        return None, "half-written (no manifest.json: the part's build did not finish)"
    try:
        manifest = load_manifest(directory)
    except (FileNotFoundError, ManifestError) as exc:
        return None, f"half-written ({exc})"
    problem = manifest_problem(manifest)
    part = manifest.get("part")
    if problem is None and not isinstance(part, dict):
        problem = "it has no 'part' section (a whole build, not a part)"
    if problem is None:
        if not all(type(part.get(k)) is int for k in PART_FIELDS):
            problem = f"its 'part' section lacks one of {', '.join(PART_FIELDS)}"
        elif not (
            0 <= part["index"] < part["parts"]
            and 0 <= part["first_input"] <= part["end_input"] <= part["total_inputs"]
        ):
            problem = "its 'part' section is inconsistent"
        elif not isinstance(manifest.get("build"), dict) or not isinstance(manifest.get("environment"), dict):
            problem = "it has no 'build' / 'environment' section"
    if problem is None:
        try:
            raw = BuildStats.from_raw(part["stats_raw"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problem = f"its raw statistics are unreadable ({type(exc).__name__}: {exc})"
        else:
            counts = manifest["counts"]
            if not (
                counts["inputs"] == part["end_input"] - part["first_input"] == raw.inputs
                and counts["written"] == raw.written == sum(s["samples"] for s in manifest["shards"])
                and counts["inputs"] == counts["written"] + counts["rejected"]
            ):
                problem = "its counts do not add up"
    if problem is not None:
        return None, f"damaged manifest.json: {problem}"
    for name in [shard["name"] for shard in manifest["shards"]] + [REJECTS_NAME]:
        if (directory / name).is_symlink():  # a part's files are its own: never read through a link
            return None, f"damaged: {name} is a symbolic link, not a file the part's build wrote"
    for shard in manifest["shards"]:
        path = directory / shard["name"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            return None, f"damaged: {shard['name']} is {found}, its manifest says {shard['bytes']} bytes"
    if not (directory / REJECTS_NAME).is_file():
        return None, f"damaged: {REJECTS_NAME} is missing"
    return manifest, None


def unmerge(output: Path, overwrite: bool) -> None:
    """Refuse to build parts into an OUTPUT holding a merged data set, or with ``overwrite``
    remove its manifest.json, so that it no longer looks complete while its parts are rebuilt."""
    if is_merged(output):
        if not overwrite:
            raise OutputDirError(
                f"{output} already holds a merged data set ({MANIFEST_NAME}); "
                "pass --overwrite to build it again in parts"
            )
        (Path(output) / MANIFEST_NAME).unlink(missing_ok=True)  # other parts may race to do the same


def is_merged(output: Path) -> bool:
    """OUTPUT holds the merged data set (its manifest.json, which the merge writes last)."""
    return (Path(output) / MANIFEST_NAME).is_file()


def complete_parts(output: Path, parts: int) -> list[int]:
    """The parts of OUTPUT that ``inspect_part`` finds complete; all of them once OUTPUT is merged
    (the merge then removes parts/). ``slurm.submit_prep --missing`` resubmits the others and
    ``slurm.status`` counts these: one definition of a finished part, the merge's."""
    if is_merged(output):
        return list(range(parts))
    return [i for i in range(parts) if inspect_part(part_dir(output, i))[0] is not None]


@dataclass
class PartPlan:
    directory: Path
    skip: bool  # complete, same build: nothing to do
    note: str | None  # a line for the log (skipped, or why the directory is rebuilt)


def prepare_part(
    output: Path, index: int, parts: int, recorded: dict[str, Any], overwrite: bool
) -> PartPlan:
    """Get ``OUTPUT/parts/part-IIIII`` ready for a part build, or say it is already built.

    ``recorded``: the build's recorded options and inputs (the manifest's ``build``). A complete
    part of the same build (same options, inputs, environment and N) is skipped; a half-written
    one is rebuilt from scratch; a complete one of another build needs ``overwrite``. ``OUTPUT``
    holding a merged data set (manifest.json) needs ``overwrite`` too, which then removes that
    manifest.json, so that OUTPUT no longer looks complete while its parts are rebuilt; nothing else
    in OUTPUT is touched (other parts may be writing).
    """
    output = Path(output)
    directory = part_dir(output, index)
    label = f"part {index}/{parts}"
    unmerge(output, overwrite)
    _make_dirs(directory)
    manifest, problem = inspect_part(directory)
    note = None
    if manifest is not None:
        ours = as_written({"build": recorded, "environment": environment(), "parts": parts})
        wrong = mismatch(ours, identity(manifest), "this build", "the part there")
        if wrong is None and manifest["part"]["index"] == index:
            return PartPlan(
                directory,
                True,
                f"data_prep build: {label} is already complete in {directory} "
                "(same inputs, options and environment); skipped",
            )
        wrong = wrong or f"its manifest says it is part {manifest['part']['index']}"
        if not overwrite:
            raise OutputDirError(
                f"{directory} holds a complete part of another build: {wrong}; pass --overwrite to replace it"
            )
        note = f"data_prep build: {label}: replacing {directory} (a part of another build: {wrong})"
    elif any(directory.iterdir()):
        note = f"data_prep build: {label}: {directory} is {problem}; rebuilding it from scratch"
    prepare_output(directory, overwrite=True, keep=())
    return PartPlan(directory, False, note)
