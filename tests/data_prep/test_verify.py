"""Acceptance 4: `verify` passes a fresh build and fails loudly on shards changed after it."""

import json
import shutil
import tarfile

import pytest

from data_prep.verify import verify
from tests.data_prep.helpers import build, conv, jpeg, run_cli, write, write_jsonl


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One real build (with Energon metadata); each test damages its own copy."""
    tmp_path = tmp_path_factory.mktemp("verify")
    root = tmp_path / "img"
    records = []
    for i in range(12):
        write(root / f"{i}.jpg", jpeg(64 + 16 * i, 64, color=(20 * i, 50, 90)))
        records.append(conv(f"{i}.jpg", id=f"v{i}"))
    records.append(conv("missing.jpg", id="gone"))
    ann = write_jsonl(tmp_path / "ann.jsonl", records)
    out = tmp_path / "out"
    build("neo-json", [ann], out, image_root=root, shard_max_samples=5, energon=True)
    return out


@pytest.fixture
def built(pristine, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    return copy



def test_fresh_build_verifies(built):
    report = verify(built)
    assert report.ok, report.errors
    assert (report.shards, report.samples, report.images) == (3, 12, 12)
    proc = run_cli("verify", str(built))
    assert proc.returncode == 0 and "verify OK" in proc.stdout


def test_truncated_shard_fails(built):
    shard = built / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    report = verify(built)
    assert not report.ok
    text = "\n".join(report.errors)
    assert "shard-000001.tar" in text and "truncated or edited" in text and "sha256" in text
    proc = run_cli("verify", str(built))
    assert proc.returncode == 1 and "verify FAILED" in proc.stderr and "shard-000001.tar" in proc.stderr


def test_same_size_edit_inside_a_json_fails(built):
    shard = built / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b'"A thing."')
    data[at + 3] = ord("X")  # same length: only the hash (and the content) can tell
    shard.write_bytes(bytes(data))
    errors = verify(built).errors
    assert any("sha256 differs" in e for e in errors)


def test_edited_image_pixels_fail(built):
    """Rewrite one sample's image with a different size through tarfile (a well-formed tar)."""
    shard = built / "shard-000002.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    import io

    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name.endswith(".img0.jpg"):
                data = jpeg(32, 32)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    errors = "\n".join(verify(built).errors)
    assert "json says RGB" in errors and "sha256 differs" in errors


def test_missing_extra_and_bookkeeping_problems(built):
    (built / "shard-000000.tar").unlink()
    (built / "shard-000009.tar").write_bytes(b"")
    with open(built / "rejects.jsonl", "a") as f:
        f.write(json.dumps({"reason": "missing_image"}) + "\n")
    errors = "\n".join(verify(built).errors)
    assert "listed in the manifest but missing" in errors
    assert "shard-000009.tar: a shard that the manifest does not list" in errors
    assert "rejects" in errors


def test_missing_energon_metadata_and_manifest(built):
    (built / "shard-000000.tar.idx").unlink()
    assert any("energon prepare did not run" in e for e in verify(built).errors)
    assert verify(built, check_energon=False).ok
    (built / "manifest.json").unlink()
    assert not verify(built).ok
