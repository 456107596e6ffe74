"""Energon metadata for a finished build (`.nv-meta/` and a `.tar.idx` per shard).

Runs the real `energon prepare` CLI non-interactively in a child process: it forks its own
indexing pool, prints a sample preview and may call sys.exit, none of which belongs in ours.
It reads every tar header, so a truncated shard makes the build fail here, loudly.

Also the checks of what it wrote, shared by `verify` and the trainer's loader:
``check_energon_metadata`` (`.nv-meta/` is exactly what this module writes: no class, module or
code reference Energon would import or run, no shard outside the directory) and
``check_tar_index`` (a `.tar.idx` is the index of its shard).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import yaml

ENERGON_ARGS = (
    "--non-interactive",
    "--split-ratio",
    "1,0,0",
    "--sample-type",
    "CrudeWebdataset",
    "--no-progress",
)


class EnergonPrepareError(RuntimeError):
    pass


def energon_prepare(directory: Path, num_shards: int, timeout: float = 3600) -> None:
    workers = max(1, min(num_shards, os.cpu_count() or 1, 8))
    cmd = [
        sys.executable,
        "-m",
        "megatron.energon.cli.main",
        "prepare",
        str(directory),
        *ENERGON_ARGS,
        "--num-workers",
        str(workers),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnergonPrepareError(f"energon prepare could not run: {exc}") from None
    if proc.returncode != 0 or not (Path(directory) / ".nv-meta" / "dataset.yaml").is_file():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise EnergonPrepareError(f"energon prepare failed (exit {proc.returncode}):\n{tail}")


# -- What `energon_prepare` writes, and the check that a directory holds exactly that ------------
#
# Energon's metadata is not inert: `.nv-meta/dataset.yaml` may name any class (`__module__` /
# `__class__`) and Python files to execute (`sample_loader: x.py:fn`, `part_filter: x.py:fn`,
# Energon's "crude dataset" hooks), and `split.yaml` / `.info.json` may name tar files anywhere.
# The trainer (pretrain/data/loader.py) and `verify` accept only the structure below, before
# Energon reads any of it:
#
#   .nv-meta/dataset.yaml   exactly {__module__: megatron.energon, __class__: CrudeWebdataset}
#   .nv-meta/split.yaml     exactly the keys split_parts {train, val, test} (lists of shard names;
#                           braces as `energon prepare` collapses them, e.g. shard-{000000..000004}.tar;
#                           train not empty) and exclude (a list of those shard names, or
#                           <shard>/<sample index>)
#   .nv-meta/.info.json     exactly {energon_version: str, shard_counts: {<shard name>: int >= 0}}
#   every shard name        a plain file name ending in .tar (no directory part, not hidden), a
#                           file in the directory; split.yaml names each shard of shard_counts once.
#
# YAML is read with a safe loader (never one that constructs objects) that also refuses duplicate
# keys, anchors/aliases and merge keys, and must read the same as Energon's own (rapidyaml) reader,
# so the two cannot be shown different documents.

META_DIR = ".nv-meta"
ENERGON_MODULE = "megatron.energon"
SAMPLE_TYPE = "CrudeWebdataset"  # ENERGON_ARGS' --sample-type
DATASET_YAML = {"__module__": ENERGON_MODULE, "__class__": SAMPLE_TYPE}
SPLIT_PARTS = ("train", "val", "test")  # --split-ratio 1,0,0
TAR_INDEX_SUFFIX = ".idx"  # shard-000000.tar -> shard-000000.tar.idx
MAX_METADATA_BYTES = 16 << 20
# A file name in the build directory: no directory part, not hidden, no braces left after expansion.
_SHARD_NAME = re.compile(r"^(?!\.)[^/\\\x00-\x1f{}]+\.tar$")
_EXCLUDE_SAMPLE = re.compile(r"^(?P<shard>[^/]+)/(?P<index>[0-9]+)$")
# Energon's grouping of tar members into samples (megatron/energon/flavors/webdataset/config.py):
# regular files whose name is <base>.<part>, minus __meta__ entries; consecutive equal bases = 1 sample.
ENERGON_SPLIT_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
ENERGON_SKIP_META = re.compile(r"__[^/]*__($|/)")


class MetadataError(ValueError):
    """A metadata file that cannot be read safely (message: one line naming the file)."""


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only) that also refuses what YAML readers disagree on."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed")
        if getattr(self.peek_event(), "anchor", None) is not None:
            raise yaml.YAMLError("anchors (&name) are not allowed")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        def refuse(what: str, key_node) -> yaml.constructor.ConstructorError:
            return yaml.constructor.ConstructorError(None, None, what, key_node.start_mark)

        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise refuse("merge keys (<<) are not allowed", key_node)
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise refuse("unhashable key", key_node) from None
            if duplicate:
                raise refuse(f"duplicate key {key!r}", key_node)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_bounded(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise MetadataError(f"{path}: {size} bytes, more than any metadata file we write")
        return path.read_bytes()
    except OSError as exc:
        raise MetadataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def load_yaml_data(path: Path) -> Any:
    """A YAML file as plain data: safe loading only, no duplicate keys, anchors, aliases or merge
    keys, and the same result as Energon's own reader (else MetadataError, one line)."""
    data = _read_bounded(path)
    try:
        ours = yaml.load(data, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise MetadataError(f"{path}: not plain YAML data: {detail}") from None
    try:
        from megatron.energon.eyaml import load_yaml as energon_load_yaml

        theirs = energon_load_yaml(data)
    except ImportError:  # no Energon here: nothing can read the file differently
        return ours
    except Exception as exc:  # noqa: BLE001 - whatever the other reader trips over
        raise MetadataError(f"{path}: Energon's YAML reader fails on it: {type(exc).__name__}") from None
    if theirs != ours:
        raise MetadataError(f"{path}: Energon's YAML reader reads it differently from a plain YAML reader")
    return ours


def load_json_data(path: Path) -> Any:
    """A JSON file as plain data; duplicate keys are refused (else MetadataError, one line)."""

    def no_duplicates(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise MetadataError(f"{path}: duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(_read_bounded(path).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path}: not JSON: {exc}") from None


# A split entry as `energon prepare` writes it: a shard name, or one with a single run of shard
# numbers collapsed into an integer range (shard-{000000..000004}.tar; bracecollapse.py).
_SPLIT_ENTRY = re.compile(r"^([^{}\\]*)(?:\{([0-9]{1,20})\.\.([0-9]{1,20})\}([^{}\\]*))?$")


def _expand_shard_names(entry: str, limit: int) -> list[str] | None:
    """Energon's brace expansion of one split entry, or None when it is not of the form that
    `energon prepare` writes or would name more than ``limit`` shards (no expansion bombs:
    braceexpand materialises whole ranges)."""
    m = _SPLIT_ENTRY.match(entry)
    if m is None:
        return None
    if m.group(2) is not None and abs(int(m.group(3)) - int(m.group(2))) + 1 > limit:
        return None
    from braceexpand import braceexpand

    return list(braceexpand(entry))


def check_energon_metadata(directory: Path) -> list[str]:
    """Problems that make ``directory/.nv-meta`` other than what ``energon_prepare`` writes, one
    line each, naming the file and the key (empty: the trainer may hand it to Energon). Reads
    only plain data; imports, runs and opens nothing that the metadata names."""
    directory = Path(directory)
    meta = directory / META_DIR
    problems: list[str] = []
    if not meta.is_dir():
        return [f"{meta}: missing (not a finished data_prep build)"]

    dataset_yaml = meta / "dataset.yaml"
    try:
        dataset = load_yaml_data(dataset_yaml)
    except MetadataError as exc:
        problems.append(str(exc))
    else:
        if not isinstance(dataset, dict):
            problems.append(
                f"{dataset_yaml}: not a mapping (data_prep writes __module__: {ENERGON_MODULE}, __class__: {SAMPLE_TYPE})"
            )
        else:
            for key in dataset:
                if key not in DATASET_YAML:
                    problems.append(
                        f"{dataset_yaml}: key {key!r} is not allowed (data_prep writes only "
                        f"__module__: {ENERGON_MODULE}, __class__: {SAMPLE_TYPE})"
                    )
            for key, want in DATASET_YAML.items():
                if dataset.get(key) != want:
                    problems.append(f"{dataset_yaml}: {key} is {dataset.get(key)!r}, data_prep writes {want!r}")

    shard_counts: dict | None = None
    info_json = meta / ".info.json"
    try:
        info = load_json_data(info_json)
    except MetadataError as exc:
        problems.append(str(exc))
    else:
        if not isinstance(info, dict) or set(info) != {"energon_version", "shard_counts"}:
            keys = sorted(info) if isinstance(info, dict) else type(info).__name__
            problems.append(f"{info_json}: keys {keys}, energon prepare writes ['energon_version', 'shard_counts']")
        elif not isinstance(info["energon_version"], str):
            problems.append(f"{info_json}: energon_version is not a string")
        elif not isinstance(info["shard_counts"], dict) or not info["shard_counts"]:
            problems.append(f"{info_json}: shard_counts is not a mapping of shard names to sample counts")
        else:
            shard_counts = info["shard_counts"]
            for name, count in shard_counts.items():
                if not _SHARD_NAME.match(name):
                    problems.append(f"{info_json}: shard_counts key {name!r} is not a shard file name in this directory")
                elif not (directory / name).is_file():
                    problems.append(f"{info_json}: shard_counts key {name!r}: no such shard in {directory}")
                if type(count) is not int or count < 0:
                    problems.append(f"{info_json}: shard_counts[{name!r}] is {count!r}, not a sample count")

    split_yaml = meta / "split.yaml"
    try:
        split = load_yaml_data(split_yaml)
    except MetadataError as exc:
        problems.append(str(exc))
        return problems
    if not isinstance(split, dict) or set(split) != {"split_parts", "exclude"}:
        keys = sorted(split, key=str) if isinstance(split, dict) else type(split).__name__
        problems.append(f"{split_yaml}: keys {keys}, energon prepare writes ['exclude', 'split_parts']")
        return problems
    parts = split["split_parts"]
    if not isinstance(parts, dict) or set(parts) != set(SPLIT_PARTS):
        keys = sorted(parts, key=str) if isinstance(parts, dict) else type(parts).__name__
        problems.append(f"{split_yaml}: split_parts has keys {keys}, energon prepare writes {list(SPLIT_PARTS)}")
        return problems
    if shard_counts is None:
        return problems  # the split's names are checked against .info.json's, which is broken
    known = set(shard_counts)
    listed: list[str] = []
    for part in SPLIT_PARTS:
        entries = parts[part]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            problems.append(f"{split_yaml}: split_parts.{part} is not a list of shard names")
            continue
        for entry in entries:
            names = _expand_shard_names(entry, len(known))
            if names is None:
                problems.append(
                    f"{split_yaml}: split_parts.{part} entry {entry!r} is not a shard name or a range of "
                    f"at most the {len(known)} shard(s) .info.json lists"
                )
                continue
            for name in names:
                if not _SHARD_NAME.match(name) or name not in known:
                    problems.append(
                        f"{split_yaml}: split_parts.{part} names {name!r}, not a shard of this directory's .info.json"
                    )
                listed.append(name)
    if parts["train"] == []:
        problems.append(f"{split_yaml}: split_parts.train is empty")
    if sorted(listed) != sorted(known):
        problems.append(f"{split_yaml}: split_parts do not name each shard of .info.json exactly once")
    exclude = split["exclude"]
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        problems.append(f"{split_yaml}: exclude is not a list of shard names")
    else:
        for entry in exclude:
            m = _EXCLUDE_SAMPLE.match(entry)
            shard = m.group("shard") if m else entry
            if shard not in known:
                problems.append(f"{split_yaml}: exclude names {entry!r}, not a shard of this directory")
    return problems


# -- .tar.idx ------------------------------------------------------------------------------------
#
# Energon's tar index (megatron/energon/flavors/webdataset/itar.py, written by `energon prepare`
# in prepare.py's _preprocess_tar): no header, a flat array of unsigned 64-bit byte offsets in
# the machine's byte order (struct "Q": little-endian on x86-64 and arm64). Entry i is the offset
# of the tar header of sample i's first member (samples = consecutive regular members sharing a
# base name, ENERGON_SPLIT_NAME / ENERGON_SKIP_META); one last entry is the offset just past the
# last member (where the end-of-archive blocks start). So: 8 * (samples + 1) bytes, strictly
# increasing, entry 0 at the first sample's header, all inside the tar.


def tar_index_offsets(shard: Path) -> list[int]:
    """The index ``energon prepare`` writes for ``shard``, computed from the tar itself."""
    offsets: list[int] = []
    last_base = None
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isreg() or member.name is None or ENERGON_SKIP_META.match(member.name):
                continue
            m = ENERGON_SPLIT_NAME.match(member.name)
            if m is None:
                continue
            if m.group(1) != last_base:
                offsets.append(member.offset)
                last_base = m.group(1)
        offsets.append(tar.offset)
    return offsets


def read_tar_index(index: Path) -> list[int]:
    data = index.read_bytes()
    if len(data) % 8:
        raise MetadataError(f"{index.name}: {len(data)} bytes, not a whole number of 8-byte offsets")
    return [v for (v,) in struct.iter_unpack("<Q", data)]


def check_tar_index(shard: Path) -> str | None:
    """One line naming the shard when its ``.tar.idx`` is not the index of this tar, else None."""
    shard = Path(shard)
    index = shard.with_name(shard.name + TAR_INDEX_SUFFIX)
    fix = "the index is stale or corrupt: rebuild the directory with data_prep"
    if not index.is_file():
        return f"{index.name} is missing (energon prepare did not run)"
    try:
        got = read_tar_index(index)
    except MetadataError as exc:
        return f"{shard.name}: index {exc}: {fix}"
    except OSError as exc:
        return f"{shard.name}: index {index.name} cannot be read: {exc}"
    try:
        want = tar_index_offsets(shard)
    except (tarfile.TarError, OSError, EOFError):
        return None  # an unreadable tar is its own error
    if got == want:
        return None
    samples = len(want) - 1
    size = shard.stat().st_size
    if len(got) != len(want):
        what = f"{len(got)} offsets for {samples} samples (expected {samples + 1}: one per sample plus the end)"
    elif any(v >= size for v in got):
        i = next(i for i, v in enumerate(got) if v >= size)
        what = f"offset #{i} is {got[i]}, past the end of the {size}-byte tar"
    elif any(b <= a for a, b in zip(got, got[1:])):
        i = next(i for i, (a, b) in enumerate(zip(got, got[1:])) if b <= a) + 1
        what = f"offsets are not increasing at #{i} ({got[i - 1]} then {got[i]})"
    else:
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        where = "the end of the last sample" if i == samples else f"sample {i}'s first member header"
        what = f"offset #{i} is {got[i]}, but {where} is at {want[i]}"
    return f"{shard.name}: {index.name} does not index this shard: {what}: {fix}"
