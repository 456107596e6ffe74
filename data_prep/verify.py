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
from data_prep.manifest import FORMAT_NAME, REJECTS_NAME, load_manifest
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


def verify(directory: Path, check_energon: bool = True) -> VerifyReport:
    directory = Path(directory)
    report = VerifyReport(directory)
    errors = report.errors
    try:
        manifest = load_manifest(directory)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        errors.append(str(exc))
        return report
    if manifest.get("format") != FORMAT_NAME or manifest.get("schema_version") != SCHEMA_VERSION:
        errors.append(
            f"manifest format {manifest.get('format')!r} v{manifest.get('schema_version')} is not "
            f"{FORMAT_NAME!r} v{SCHEMA_VERSION}"
        )
        return report
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
        with open(rejects_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    by_reason[json.loads(line)["reason"]] += 1
                except (json.JSONDecodeError, KeyError, TypeError):
                    errors.append(f"{REJECTS_NAME} line {lineno} is not a reject entry")
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
    return report


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
