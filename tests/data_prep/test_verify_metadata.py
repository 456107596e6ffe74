"""`verify` checks the Energon metadata too: `.nv-meta/` must be exactly what data_prep writes (the
trainer's own check, data_prep.energon_prepare.check_energon_metadata) and every `.tar.idx` must
be the index of its shard (a garbage index used to pass verify and fail training later with
"Inconsistent sample base name")."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from data_prep.energon_prepare import (
    ENERGON_SKIP_META,
    ENERGON_SPLIT_NAME,
    check_energon_metadata,
    check_tar_index,
    read_tar_index,
    tar_index_offsets,
)
from data_prep.verify import verify
from tests.data_prep.helpers import build, conv, encode, noise_rgb, run_cli, write, write_jsonl

SHARDS = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # 5, 5 and 2 samples


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One real build with Energon metadata; noise images of growing size, so no two shards have
    the same tar layout (and so the same index)."""
    tmp_path = tmp_path_factory.mktemp("verify_meta")
    root = tmp_path / "img"
    records = []
    for i in range(12):
        write(root / f"{i}.jpg", encode(noise_rgb(64 + 16 * i, 64, seed=i), "JPEG", quality=95))
        records.append(conv(f"{i}.jpg", id=f"m{i}"))
    ann = write_jsonl(tmp_path / "ann.jsonl", records)
    out = tmp_path / "out"
    build("neo-json", [ann], out, image_root=root, shard_max_samples=5, energon=True)
    return out


@pytest.fixture
def built(pristine, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    return copy



def test_clean_build_metadata_and_indexes(built):
    from megatron.energon.flavors.webdataset.config import skip_meta_re, split_name_re
    from megatron.energon.flavors.webdataset.itar import TarIndexReader

    # Our copies of Energon's sample grouping rules are Energon's.
    assert (ENERGON_SPLIT_NAME.pattern, ENERGON_SKIP_META.pattern) == (split_name_re.pattern, skip_meta_re.pattern)
    assert check_energon_metadata(built) == []
    assert json.loads((built / ".nv-meta" / ".info.json").read_text())["shard_counts"] == dict(
        zip(SHARDS, [5, 5, 2])
    )
    for name, samples in zip(SHARDS, [5, 5, 2]):
        shard = built / name
        with TarIndexReader(str(shard)) as reader:
            energon = list(reader)
        # The format: 8-byte offsets, one per sample (its first member's header) plus the end.
        assert read_tar_index(built / (name + ".idx")) == energon == tar_index_offsets(shard)
        assert len(energon) == samples + 1 and energon[0] == 0 and energon == sorted(set(energon))
        assert check_tar_index(shard) is None
    assert verify(built).ok


def _errors(built) -> list[str]:
    report = verify(built)
    assert not report.ok
    return report.errors


def _swap(a, b):
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _edit_entries(path, edit):
    entries = read_tar_index(path)
    edit(entries)
    path.write_bytes(b"".join(v.to_bytes(8, "little") for v in entries))


GARBAGE = {
    "random bytes": lambda d: (d / "shard-000001.tar.idx").write_bytes(os.urandom(48)),
    "random odd length": lambda d: (d / "shard-000001.tar.idx").write_bytes(os.urandom(45)),
    "empty": lambda d: (d / "shard-000001.tar.idx").write_bytes(b""),
    "truncated by one entry": lambda d: (d / "shard-000001.tar.idx").write_bytes(
        (d / "shard-000001.tar.idx").read_bytes()[:-8]
    ),
    "truncated mid-entry": lambda d: (d / "shard-000001.tar.idx").write_bytes(
        (d / "shard-000001.tar.idx").read_bytes()[:-3]
    ),
    "zeroed": lambda d: (d / "shard-000001.tar.idx").write_bytes(bytes(48)),
    "entry past the end": lambda d: _edit_entries(
        d / "shard-000001.tar.idx", lambda e: e.__setitem__(2, 1 << 40)
    ),
    "entries out of order": lambda d: _edit_entries(
        d / "shard-000001.tar.idx", lambda e: e.__setitem__(slice(1, 3), [e[2], e[1]])
    ),
    "entry off by one block": lambda d: _edit_entries(
        d / "shard-000001.tar.idx", lambda e: e.__setitem__(3, e[3] + 512)
    ),
}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_index_fails_naming_the_shard(built, name):
    GARBAGE[name](built)
    errors = _errors(built)
    assert len(errors) == 1 and errors[0].startswith("shard-000001.tar: "), errors
    assert "shard-000001.tar.idx" in errors[0], errors


def test_indexes_swapped_between_shards_fail(built):
    """Same sample count (5 and 5), other offsets: and a swap with the 2-sample shard."""
    assert (built / "shard-000000.tar.idx").read_bytes() != (built / "shard-000001.tar.idx").read_bytes()
    _swap(built / "shard-000000.tar.idx", built / "shard-000001.tar.idx")
    errors = _errors(built)
    assert sorted(e.split(":")[0] for e in errors) == ["shard-000000.tar", "shard-000001.tar"], errors
    _swap(built / "shard-000000.tar.idx", built / "shard-000001.tar.idx")
    _swap(built / "shard-000001.tar.idx", built / "shard-000002.tar.idx")
    errors = _errors(built)
    assert sorted(e.split(":")[0] for e in errors) == ["shard-000001.tar", "shard-000002.tar"], errors
    assert all("offsets for" in e for e in errors), errors
    proc = run_cli("verify", str(built))
    assert proc.returncode == 1 and "shard-000002.tar" in proc.stderr and "verify OK" not in proc.stdout


def test_dataset_yaml_naming_code_fails_and_never_runs(built, tmp_path):
    marker = tmp_path / "MARKER"
    meta = built / ".nv-meta"
    (meta / "sample_loader.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "def sample_loader(raw):\n    return raw\ndef part_filter(part):\n    return True\n"
    )
    (meta / "dataset.yaml").write_text(
        "__module__: megatron.energon\n__class__: CaptioningWebdataset\n"
        "sample_loader: sample_loader.py:sample_loader\npart_filter: sample_loader.py:part_filter\n"
    )
    errors = _errors(built)
    assert any("dataset.yaml" in e and "'sample_loader'" in e for e in errors), errors
    assert any("dataset.yaml" in e and "'part_filter'" in e for e in errors), errors
    assert any("__class__ is 'CaptioningWebdataset'" in e for e in errors), errors
    proc = run_cli("verify", str(built))
    assert proc.returncode == 1 and "verify OK" not in proc.stdout and "sample_loader" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "filename, content, needle",
    [
        ("split.yaml", "split_parts:\n  train:\n  - ../x/shard-000000.tar\n  val: []\n  test: []\nexclude: []\n",
         "split_parts.train"),
        ("split.yaml", "split_parts:\n  train:\n  - shard-{000000..000001}.tar\n  val: []\n  test: []\nexclude: []\n",
         "exactly once"),
        ("split.yaml", "split_parts:\n  train:\n  - shard-{000000..000002}.tar\n  val: []\n  test: []\n"
         "exclude: []\nextra: 1\n", "keys"),
        (".info.json", json.dumps({"energon_version": "7.4.1", "shard_counts": dict(zip(SHARDS, [5, 5, 3]))}),
         "shard_counts"),
        (".info.json", json.dumps({"energon_version": "7.4.1", "shard_counts": dict(zip(SHARDS, [5, 5, -2]))}),
         "not a sample count"),
    ],
    ids=["shard elsewhere", "shard left out", "extra key", "wrong count", "negative count"],
)
def test_other_metadata_edits_fail(built, filename, content, needle):
    (built / ".nv-meta" / filename).write_text(content)
    errors = _errors(built)
    assert any(filename in e and needle in e for e in errors), errors


def test_clean_build_verifies_with_the_cli(built):
    proc = run_cli("verify", str(built))
    assert proc.returncode == 0 and "verify OK" in proc.stdout, proc.stderr
