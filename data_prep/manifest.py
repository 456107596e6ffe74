"""Build statistics and manifest.json.

The manifest is the build's receipt: what went in (files and their sha256, options), what came
out (shards with sample counts, bytes and sha256), what was rejected and why, and token
statistics that the trainer's packing and budgeting can use. It holds nothing that depends on
the run (no timestamps, worker counts or output path), so the same build gives the same bytes.
It is written last; a directory without it is an incomplete build. A part of a build
(data_prep.parts) adds a ``part`` section: its slice and the raw statistics (histograms) from
which data_prep.merge makes the whole build's statistics exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from data_prep.rejects import REASONS, finite
from data_prep.schema import KINDS, SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT_NAME = "neo-webdataset"


class Distribution:
    """Exact statistics of a non-negative integer quantity with bounded memory (a value histogram)."""

    def __init__(self) -> None:
        self.hist: Counter[int] = Counter()

    def add(self, value: int) -> None:
        self.hist[value] += 1

    def _percentile(self, pct: int, count: int) -> int:
        rank = max(1, -(-(pct * count) // 100))  # nearest rank, ceil(pct/100 * n) in integers
        seen = 0
        for value in sorted(self.hist):
            seen += self.hist[value]
            if seen >= rank:
                return value
        return max(self.hist)

    def update(self, other: Distribution) -> None:
        """Add another distribution's values (a histogram sums exactly, percentiles included)."""
        self.hist.update(other.hist)

    def to_raw(self) -> dict[str, int]:
        """The histogram itself, {"value": count} in ascending value order: what a part manifest
        keeps so that merged statistics equal a single build's (summaries cannot be merged)."""
        return {str(value): self.hist[value] for value in sorted(self.hist)}

    @classmethod
    def from_raw(cls, raw: dict[str, int]) -> Distribution:
        dist = cls()
        for value, n in raw.items():
            if not (isinstance(value, str) and value.isdigit() and str(int(value)) == value and is_count(n)):
                raise ValueError(f"histogram entry {value!r}: {n!r} is not a value and its count")
            dist.hist[int(value)] += n
        return dist

    def summary(self) -> dict[str, Any]:
        count = sum(self.hist.values())
        if count == 0:
            return {"count": 0, "total": 0}
        total = sum(v * n for v, n in self.hist.items())
        return {
            "count": count,
            "total": total,
            "min": min(self.hist),
            "max": max(self.hist),
            "mean": round(total / count, 4),
            "p50": self._percentile(50, count),
            "p90": self._percentile(90, count),
            "p99": self._percentile(99, count),
        }


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool): what a count read from JSON must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class BuildStats:
    """Everything counted while writing, aggregated in input order."""

    COUNTS = ("inputs", "written", "images", "tag_inserted", "input_bytes")
    DISTRIBUTIONS = (
        "image_tokens_per_image",
        "image_tokens_per_sample",
        "images_per_sample",
        "text_tokens_per_sample",
        "text_chars_per_sample",
    )

    def __init__(self) -> None:
        self.inputs = 0
        self.written = 0
        self.by_kind: Counter[str] = Counter()
        self.images = 0
        self.tag_inserted = 0
        self.input_bytes = 0
        self.image_tokens_per_image = Distribution()
        self.image_tokens_per_sample = Distribution()
        self.images_per_sample = Distribution()
        self.text_tokens_per_sample = Distribution()
        self.text_chars_per_sample = Distribution()
        self.has_text_tokens = False

    def add_written(
        self,
        kind: str,
        image_tokens: list[int],
        text_tokens: int | None,
        text_chars: int,
        input_bytes: int,
        tag_inserted: bool,
    ) -> None:
        self.inputs += 1
        self.written += 1
        self.by_kind[kind] += 1
        self.images += len(image_tokens)
        self.tag_inserted += int(tag_inserted)
        self.input_bytes += input_bytes
        for n in image_tokens:
            self.image_tokens_per_image.add(n)
        self.image_tokens_per_sample.add(sum(image_tokens))
        self.images_per_sample.add(len(image_tokens))
        self.text_chars_per_sample.add(text_chars)
        if text_tokens is not None:
            self.has_text_tokens = True
            self.text_tokens_per_sample.add(text_tokens)

    def add_rejected(self) -> None:
        self.inputs += 1

    def update(self, other: BuildStats) -> None:
        """Add the counts of another slice of the inputs (parts of one build merge this way)."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.by_kind.update(other.by_kind)
        for name in self.DISTRIBUTIONS:
            getattr(self, name).update(getattr(other, name))
        self.has_text_tokens = self.has_text_tokens or other.has_text_tokens

    def to_raw(self) -> dict[str, Any]:
        """Everything needed to rebuild these statistics exactly (JSON; see Distribution.to_raw)."""
        return {
            **{name: getattr(self, name) for name in self.COUNTS},
            "by_kind": {kind: self.by_kind.get(kind, 0) for kind in KINDS},
            "has_text_tokens": self.has_text_tokens,
            "histograms": {name: getattr(self, name).to_raw() for name in self.DISTRIBUTIONS},
        }

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> BuildStats:
        """Inverse of to_raw; ValueError / KeyError / TypeError on anything else."""
        stats = cls()
        for name in cls.COUNTS:
            if not is_count(raw[name]):
                raise ValueError(f"{name} is not a count")
            setattr(stats, name, raw[name])
        if set(raw["by_kind"]) - set(KINDS) or not all(is_count(n) for n in raw["by_kind"].values()):
            raise ValueError("by_kind is not a count per sample kind")
        stats.by_kind = Counter({kind: n for kind, n in raw["by_kind"].items() if n})
        if not isinstance(raw["has_text_tokens"], bool):
            raise ValueError("has_text_tokens is not a boolean")
        stats.has_text_tokens = raw["has_text_tokens"]
        for name in cls.DISTRIBUTIONS:
            setattr(stats, name, Distribution.from_raw(raw["histograms"][name]))
        return stats


def file_digest(path: Path) -> dict[str, Any]:
    """Name, size and sha256 of an input file: the manifest pins what the build read."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"name": Path(path).name, "bytes": Path(path).stat().st_size, "sha256": sha.hexdigest()}


def environment() -> dict[str, str]:
    """Library versions that decide the output bytes (a different libjpeg gives different JPEGs)."""
    import platform

    import PIL
    from PIL import features

    return {
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg": str(features.version("jpg")),
        "zlib": str(features.version("zlib")),
    }


def make_manifest(
    *,
    build: dict[str, Any],
    stats: BuildStats,
    reject_counts: dict[str, int],
    shards: list[dict[str, Any]],
    image_extension: str,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest of a build. ``env``: the environment that made the bytes (default: this
    process's; a merge passes the one its parts were built in)."""
    rejected = sum(reject_counts.values())
    if stats.inputs != stats.written + rejected:
        raise AssertionError(f"inputs {stats.inputs} != written {stats.written} + rejected {rejected}")
    if sum(s["samples"] for s in shards) != stats.written:
        raise AssertionError("shard sample counts do not add up to the written count")
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "build": build,
        "environment": environment() if env is None else env,
        "counts": {
            "inputs": stats.inputs,
            "written": stats.written,
            "rejected": rejected,
            "reconciled": stats.inputs == stats.written + rejected,
            "by_kind": {kind: stats.by_kind.get(kind, 0) for kind in KINDS},
            "images": stats.images,
            "image_tag_inserted": stats.tag_inserted,
            "input_image_bytes": stats.input_bytes,
        },
        "rejects": {code: reject_counts.get(code, 0) for code in REASONS},
        "image_extension": image_extension,
        "stats": {
            "image_tokens_per_image": stats.image_tokens_per_image.summary(),
            "image_tokens_per_sample": stats.image_tokens_per_sample.summary(),
            "images_per_sample": stats.images_per_sample.summary(),
            "text_tokens_per_sample": stats.text_tokens_per_sample.summary()
            if stats.has_text_tokens
            else None,
            "text_chars_per_sample": stats.text_chars_per_sample.summary(),
        },
        "shards": shards,
        "total_bytes": sum(s["bytes"] for s in shards),
    }


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN / infinity replaced by its name as a string (see rejects.finite), so
    that the file is JSON that any parser reads, not Python's extension of it."""
    if isinstance(obj, float):
        return finite(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def as_written(obj: Any) -> Any:
    """``obj`` as write_json_atomic writes it and json.load reads it back (tuples become lists,
    NaN a string): what to compare a freshly made manifest section with one read from disk."""
    return json.loads(json.dumps(strict_json(obj), allow_nan=False))


def write_json_atomic(path: Path, obj: Any) -> None:
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere (an option, a statistic): write it as a string
        text = json.dumps(strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False)
    tmp = path.with_name("." + path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ManifestError(ValueError):
    """manifest.json exists but cannot be read as one (edited, truncated, not JSON)."""


def load_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a data_prep output, or the build did not finish")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ManifestError(f"{path} cannot be read as JSON ({exc}); rebuild the directory") from None
    if not isinstance(manifest, dict):
        raise ManifestError(
            f"{path} holds a JSON {type(manifest).__name__}, not an object; rebuild the directory"
        )
    return manifest
