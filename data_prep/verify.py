"""`verify DIR`: prove a built directory is exactly what its manifest says.

Checks the shard set, each shard's size and sha256 (any edit or truncation after the build),
then reads every tar member, checks every sample JSON against the contract, decodes every image
and compares it with its recorded size, and reconciles all counts (per shard, per kind, images,
image tokens, rejects by reason, inputs = written + rejected) and the Energon metadata: `.nv-meta/`
must be exactly what energon_prepare writes (the trainer's own check: nothing that names code or
files elsewhere) and every `.tar.idx` must be the index of its shard (data_prep.energon_prepare).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_prep.energon_prepare import (
    META_DIR,
    TAR_INDEX_SUFFIX,
    check_energon_metadata,
    check_tar_index,
    load_json_data,
)
from data_prep.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    ManifestError,
    is_count,
    load_manifest,
)
from data_prep.schema import SCHEMA_VERSION, image_member, make_key, validate_sample

_MEMBER = re.compile(r"^([^./]+)\.([^/]+)$")


@dataclass
class VerifyReport:
    directory: Path
    errors: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    images: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        if self.ok:
            counts = f"{self.shards} shard(s), {self.samples} samples, {self.images} images"
            return f"verify OK: {self.directory}: {counts}"
        return f"verify FAILED: {self.directory}: {len(self.errors)} problem(s)"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _check_sample(key: str, parts: dict[str, bytes], ext: str, where: str, errors: list[str]) -> dict | None:
    if "json" not in parts:
        errors.append(f"{where}: sample {key!r} has no json member")
        return None
    try:
        sample = json.loads(parts["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        errors.append(f"{where}: sample {key!r}: json does not parse: {exc}")
        return None
    problems = validate_sample(sample)
    if problems:
        errors.extend(f"{where}: sample {key!r}: {p}" for p in problems)
        return None
    if make_key(sample["id"]) != key:
        errors.append(f"{where}: key {key!r} does not belong to id {sample['id']!r}")
    expected = {"json"} | {image_member(i, ext) for i in range(len(sample["images"]))}
    if set(parts) != expected:
        errors.append(f"{where}: sample {key!r} has members {sorted(parts)}, expected {sorted(expected)}")
        return sample
    for i, info in enumerate(sample["images"]):
        name = image_member(i, ext)
        try:
            with Image.open(io.BytesIO(parts[name])) as img:
                img.load()
                size = [img.height, img.width]
                mode = img.mode
        except Exception as exc:
            errors.append(f"{where}: sample {key!r}: {name} does not decode: {type(exc).__name__}: {exc}")
            continue
        if size != info["size"] or mode != "RGB":
            errors.append(
                f"{where}: sample {key!r}: {name} is {mode} {size[0]}x{size[1]}, json says RGB "
                f"{info['size'][0]}x{info['size'][1]}"
            )
    return sample


def _read_shard(path: Path, ext: str, errors: list[str], seen_keys: dict[str, str]) -> list[dict]:
    """Every sample of one shard (members grouped by key, consecutive as WebDataset reads them)."""
    samples: list[dict] = []
    where = path.name
    current_key: str | None = None
    parts: dict[str, bytes] = {}

    def flush() -> None:
        if current_key is None:
            return
        if current_key in seen_keys:
            errors.append(f"{where}: key {current_key!r} already appears in {seen_keys[current_key]}")
        seen_keys[current_key] = where
        sample = _check_sample(current_key, parts, ext, where, errors)
        if sample is not None:
            samples.append(sample)

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    errors.append(f"{where}: member {member.name!r} is not a regular file")
                    continue
                m = _MEMBER.match(member.name)
                if not m:
                    errors.append(f"{where}: member name {member.name!r} is not <key>.<suffix>")
                    continue
                key, suffix = m.groups()
                if key != current_key:
                    flush()
                    current_key, parts = key, {}
                if suffix in parts:
                    errors.append(f"{where}: sample {key!r} has {suffix!r} twice")
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    errors.append(f"{where}: member {member.name!r} is truncated")
                parts[suffix] = data
            flush()
    except (tarfile.TarError, OSError, EOFError) as exc:
        errors.append(f"{where}: not a readable tar: {type(exc).__name__}: {exc}")
    return samples


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable for verification (a missing or mistyped field), or None.

    Only the fields verify reads are checked; their values are then compared with the files."""
    counts = manifest.get("counts")
    if not isinstance(counts, dict):
        return "'counts' is missing or not an object"
    for name in ("inputs", "written", "rejected", "images"):
        if not is_count(counts.get(name)):
            return f"'counts.{name}' is missing or not a non-negative integer"
    by_kind = counts.get("by_kind")
    if not isinstance(by_kind, dict) or not all(is_count(n) for n in by_kind.values()):
        return "'counts.by_kind' is missing or not an object of counts"
    rejects = manifest.get("rejects")
    if not isinstance(rejects, dict) or not all(is_count(n) for n in rejects.values()):
        return "'rejects' is missing or not an object of counts"
    ext = manifest.get("image_extension")
    if not isinstance(ext, str) or not ext or "/" in ext:
        return "'image_extension' is missing or not a file suffix"
    stats = manifest.get("stats")
    per_sample = stats.get("image_tokens_per_sample") if isinstance(stats, dict) else None
    if not isinstance(per_sample, dict) or not is_count(per_sample.get("total")):
        return "'stats.image_tokens_per_sample.total' is missing or not a count"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "'shards' is missing or not a list"
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{i}] is not an object"
        name = entry.get("name")
        # A plain shard file name: a manifest must not send verify to files elsewhere.
        if not isinstance(name, str) or not name.endswith(".tar") or "/" in name or "\\" in name \
                or name.startswith("."):
            return f"shards[{i}].name {name!r} is not a shard file name (NAME.tar in the directory)"
        if not is_count(entry.get("bytes")) or not is_count(entry.get("samples")):
            return f"shards[{i}] ({name}) has no 'bytes' / 'samples' count"
        if not isinstance(entry.get("sha256"), str):
            return f"shards[{i}] ({name}) has no 'sha256' string"
    return None


def verify(directory: Path, check_energon: bool = True) -> VerifyReport:
    directory = Path(directory)
    report = VerifyReport(directory)
    errors = report.errors
    try:
        manifest = load_manifest(directory)
    except (FileNotFoundError, ManifestError) as exc:
        errors.append(str(exc))
        return report
    if manifest.get("format") != FORMAT_NAME or manifest.get("schema_version") != SCHEMA_VERSION:
        errors.append(
            f"manifest format {manifest.get('format')!r} v{manifest.get('schema_version')} is not "
            f"{FORMAT_NAME!r} v{SCHEMA_VERSION}"
        )
        return report
    problem = manifest_problem(manifest)
    if problem is not None:
        errors.append(f"{directory / MANIFEST_NAME} is damaged: {problem}; rebuild the directory")
        return report
    try:
        _verify_against(directory, manifest, report, check_energon)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a field the check above missed
        errors.append(
            f"{directory / MANIFEST_NAME} is damaged: {type(exc).__name__}: {exc}; rebuild the directory"
        )
    return report


def _verify_against(directory: Path, manifest: dict, report: VerifyReport, check_energon: bool) -> None:
    errors = report.errors
    ext = manifest["image_extension"]
    counts = manifest["counts"]

    listed = {s["name"]: s for s in manifest["shards"]}
    on_disk = {p.name for p in directory.glob("*.tar")}
    for name in sorted(on_disk - set(listed)):
        errors.append(f"{name}: a shard that the manifest does not list")
    for partial in sorted(directory.glob(".*.partial")):
        errors.append(f"{partial.name}: leftover of an interrupted write")

    seen_keys: dict[str, str] = {}
    kinds: Counter[str] = Counter()
    image_tokens = 0
    for entry in manifest["shards"]:
        path = directory / entry["name"]
        if not path.is_file():
            errors.append(f"{entry['name']}: listed in the manifest but missing")
            continue
        report.shards += 1
        size = path.stat().st_size
        if size != entry["bytes"]:
            errors.append(
                f"{entry['name']}: {size} bytes, manifest says {entry['bytes']} (truncated or edited)"
            )
        if _sha256(path) != entry["sha256"]:
            errors.append(f"{entry['name']}: sha256 differs from the manifest (edited after the build)")
        samples = _read_shard(path, ext, errors, seen_keys)
        if len(samples) != entry["samples"]:
            errors.append(f"{entry['name']}: {len(samples)} valid samples, manifest says {entry['samples']}")
        for sample in samples:
            kinds[sample["kind"]] += 1
            report.images += len(sample["images"])
            image_tokens += sample["num_image_tokens"]
        report.samples += len(samples)

    if report.samples != counts["written"]:
        errors.append(f"{report.samples} samples in the shards, manifest says {counts['written']} written")
    for kind, n in counts["by_kind"].items():
        if kinds.get(kind, 0) != n:
            errors.append(f"{kinds.get(kind, 0)} {kind} samples, manifest says {n}")
    if report.images != counts["images"]:
        errors.append(f"{report.images} images, manifest says {counts['images']}")
    recorded_tokens = manifest["stats"]["image_tokens_per_sample"]["total"]
    if image_tokens != recorded_tokens:
        errors.append(f"{image_tokens} image tokens, manifest says {recorded_tokens}")

    rejects_path = directory / REJECTS_NAME
    if not rejects_path.is_file():
        errors.append(f"{REJECTS_NAME} is missing")
    else:
        by_reason: Counter[str] = Counter()
        with open(rejects_path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:  # strict JSON: a bare NaN / Infinity is not JSON, whatever Python's json accepts
                    entry = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
                    by_reason[entry["reason"]] += 1
                except (ValueError, KeyError, TypeError, RecursionError):
                    errors.append(f"{REJECTS_NAME} line {lineno} is not a reject entry (strict JSON)")
        expected = {code: n for code, n in manifest["rejects"].items() if n}
        if dict(by_reason) != expected:
            errors.append(f"{REJECTS_NAME} counts {dict(by_reason)} differ from the manifest {expected}")
        if sum(by_reason.values()) != counts["rejected"]:
            errors.append(f"{sum(by_reason.values())} rejects listed, manifest says {counts['rejected']}")
    if counts["inputs"] != counts["written"] + counts["rejected"]:
        errors.append(
            f"inputs {counts['inputs']} != written {counts['written']} + rejected {counts['rejected']}"
        )

    if check_energon and manifest["shards"]:
        _check_energon(directory, manifest, errors)


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_energon(directory: Path, manifest: dict, errors: list[str]) -> None:
    """`.nv-meta/` is exactly what energon_prepare writes (the trainer's own check, so a directory
    that verifies also loads), its counts are the manifest's, and every `.tar.idx` indexes its shard."""
    meta = directory / META_DIR
    missing = [name for name in ("dataset.yaml", "split.yaml", ".info.json") if not (meta / name).is_file()]
    for name in missing:
        errors.append(f"{META_DIR}/{name} is missing (energon prepare did not run)")
    if not missing:
        problems = check_energon_metadata(directory)
        errors.extend(problems)
        if not problems:
            counts = load_json_data(meta / ".info.json")["shard_counts"]
            listed = {e["name"]: e["samples"] for e in manifest["shards"]}
            if counts != listed:
                errors.append(
                    f"{META_DIR}/.info.json shard_counts {counts} differ from the manifest's shards {listed}"
                )
    for entry in manifest["shards"]:
        path = directory / entry["name"]
        if path.is_file():
            problem = check_tar_index(path)
            if problem:
                errors.append(problem)
        elif not path.with_name(path.name + TAR_INDEX_SUFFIX).is_file():
            errors.append(f"{entry['name']}.idx is missing (energon prepare did not run)")
