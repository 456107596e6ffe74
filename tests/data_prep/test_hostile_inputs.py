"""Nothing lost, nothing silent: hostile or awkward inputs through the real command line.

Every user error is one line (what is wrong, what to do) with exit code 2 for usage errors and 1
for failures, never a traceback, and a failed build leaves no manifest.json. Awkward records
(nested 500 deep, NaN floats, a byte-order mark) never fail a build: each is one accepted or one
rejected input, and the counts reconcile.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.manifest import write_json_atomic
from tests.data_prep.helpers import cli, conv, jpeg, one_error_line, run_cli, write, write_jsonl

BOM = b"\xef\xbb\xbf"
FAST = ["--workers", "1", "--no-progress", "--no-energon", "--min-pixels", "1024", "--max-pixels", "65536"]





def strict_json(text: str):
    """json.loads that refuses Python's NaN / Infinity extension, as other languages' parsers do."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def reconciled(out: Path) -> dict:
    """The manifest, after checking inputs = written + rejected against it and rejects.jsonl."""
    manifest = strict_json((out / "manifest.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]
    rejects = [strict_json(line) for line in (out / "rejects.jsonl").read_text(encoding="ascii").splitlines()]
    assert counts["inputs"] == counts["written"] + counts["rejected"] and counts["reconciled"]
    assert len(rejects) == counts["rejected"] == sum(manifest["rejects"].values())
    return manifest


def reasons(manifest: dict) -> dict[str, int]:
    return {code: n for code, n in manifest["rejects"].items() if n}


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "img"
    for i in range(3):
        write(root / f"{i}.jpg", jpeg(64 + 8 * i, 48, color=(40 * i, 90, 160)))
    return root


# ------------------------------------------------------------------------ --overwrite and tokenizer/


def test_overwrite_keeps_the_users_tokenizer(tmp_path, images, capsys):
    ann = write_jsonl(tmp_path / "ann.jsonl", [conv(f"{i}.jpg", id=f"r{i}") for i in range(3)])
    out = tmp_path / "out"
    tokenizer = out / "tokenizer"
    write(tokenizer / "tokenizer.json", b'{"mine": true}')
    write(tokenizer / "special_tokens_map.json", b"{}")
    before = {p.name: p.read_bytes() for p in tokenizer.iterdir()}
    args = ["build", "--format", "neo-json", "--annotations", ann, "--image-root", images, "--output", out]
    args += FAST

    # A directory holding only the user's tokenizer/ is not a build: no --overwrite needed.
    code, stdout, stderr = cli(capsys, *args)
    assert code == 0, stderr
    assert f"kept {tokenizer}" in stdout and stdout.strip().splitlines()[-1].startswith("data_prep: 3 inputs")
    assert {p.name: p.read_bytes() for p in tokenizer.iterdir()} == before

    code, stdout, stderr = cli(capsys, *args)  # now it holds a build
    assert code == 2 and "--overwrite" in one_error_line(stderr)

    code, stdout, stderr = cli(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert f"kept {tokenizer}" in stdout
    assert {p.name: p.read_bytes() for p in tokenizer.iterdir()} == before
    assert reconciled(out)["counts"]["written"] == 3
    code, stdout, stderr = cli(capsys, "verify", out, "--no-energon")
    assert code == 0, stderr


# ------------------------------------------------------------------------------ read-only --output


def _make_read_only(path: Path) -> bool:
    """chmod a-w, plus the immutable attribute when running as root (root ignores mode bits).
    False if the directory still takes a file."""
    path.chmod(0o555)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            return False
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    try:
        (path / ".probe").write_bytes(b"")
    except OSError:
        return True
    (path / ".probe").unlink()
    return False


def _undo_read_only(path: Path) -> None:
    if shutil.which("chattr") is not None:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def test_read_only_output_is_one_line(tmp_path, images):
    ann = write_jsonl(tmp_path / "ann.jsonl", [conv("0.jpg", id="a")])
    locked = tmp_path / "locked"
    locked.mkdir()
    try:
        if not _make_read_only(locked):
            pytest.skip("cannot make a directory read-only here (root without chattr +i)")
        for out, what in ((locked, "cannot write to"), (locked / "new", "cannot create")):
            proc = run_cli(
                "build", "--format", "neo-json", "--annotations", ann, "--image-root", images,
                "--output", out, *FAST,
            )
            assert proc.returncode == 2, proc.stderr
            line = one_error_line(proc.stderr)
            assert what in line and "choose a directory you can write to" in line
        assert list(locked.iterdir()) == []
    finally:
        _undo_read_only(locked)


# ------------------------------------------------------------------------- verify: edited manifest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_verify")
    root = tmp / "img"
    write(root / "a.jpg", jpeg())
    ann = write_jsonl(tmp / "ann.jsonl", [conv("a.jpg", id="a"), conv("missing.jpg", id="b")])
    out = tmp / "out"
    code = main(["build", "--format", "neo-json", "--annotations", str(ann), "--image-root", str(root),
                 "--output", str(out), *FAST])
    assert code == 0
    return out


def _drop_by_kind(m):
    del m["counts"]["by_kind"]


def _shard_elsewhere(m):
    m["shards"][0]["name"] = "../elsewhere.tar"


def _string_count(m):
    m["counts"]["written"] = "1"


def _no_shards(m):
    del m["shards"]


def _shard_not_object(m):
    m["shards"][0] = "shard-000000.tar"


def _no_stats(m):
    del m["stats"]


EDITS = {
    "by_kind removed": (_drop_by_kind, "counts.by_kind"),
    "shard outside": (_shard_elsewhere, "not a shard file name"),
    "count a string": (_string_count, "counts.written"),
    "shards removed": (_no_shards, "'shards'"),
    "shard not an object": (_shard_not_object, "shards[0]"),
    "stats removed": (_no_stats, "stats.image_tokens_per_sample"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_verify_reports_an_edited_manifest_as_one_error(pristine, tmp_path, edit):
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    change, expected = EDITS[edit]
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("verify", out, "--no-energon")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr
    assert lines[1].startswith("verify FAILED") and "1 problem(s)" in lines[1], proc.stderr
    assert "manifest.json is damaged" in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize(
    "content", [b"[1, 2]", b"{not json", b'{"format": "\xff\xfe"}'], ids=["list", "not-json", "not-utf8"]
)
def test_verify_reports_an_unreadable_manifest_as_one_error(pristine, tmp_path, content):
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    (out / "manifest.json").write_bytes(content)
    proc = run_cli("verify", out, "--no-energon")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "manifest.json" in lines[0] and lines[1].startswith("verify FAILED")


# ------------------------------------------------------------------------------ deeply nested JSON


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_records_are_rejected_not_fatal(tmp_path, images):
    good = [json.dumps(conv(f"{i}.jpg", id=f"g{i}")).encode() for i in range(2)]
    deep_record = ('{"id": "deep", "meta": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}").encode()
    lines = [
        good[0],
        _nested(500).encode(),  # a packed entry holding a 499-deep "record"
        deep_record,  # an object with a field nested 500 deep
        _nested(100_000).encode(),  # deeper than the JSON parser goes
        good[1],
    ]
    ann = write_jsonl(tmp_path / "deep.jsonl", lines)
    doc = tmp_path / "deep.json"  # a whole-file JSON document with one deep entry among good ones
    doc.write_text("[" + json.dumps(conv("2.jpg", id="d0")) + ", " + deep_record.decode() + "]")
    out = tmp_path / "out"
    proc = run_cli(
        "build", "--format", "neo-json", "--annotations", ann, doc, "--image-root", images, "--output", out,
        *FAST[:1], "2", *FAST[2:],  # two workers: the rejected records cross a process boundary
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    manifest = reconciled(out)
    assert (manifest["counts"]["inputs"], manifest["counts"]["written"]) == (7, 3)
    assert reasons(manifest) == {"malformed_record": 3, "malformed_json": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == ["deep.jsonl:2.0", "deep", "deep.jsonl:4", "deep"]
    assert "nested more than" in rejects[0]["message"] and "too deeply" in rejects[2]["message"]
    assert run_cli("verify", out, "--no-energon").returncode == 0


# ---------------------------------------------------------------------------------- byte-order mark


def test_byte_order_mark_loses_nothing(tmp_path, images):
    records = [json.dumps(conv(f"{i}.jpg", id=f"b{i}")).encode() for i in range(3)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(BOM + b"\n".join(records) + b"\n")
    doc = tmp_path / "bom.json"
    doc.write_bytes(BOM + json.dumps([conv("0.jpg", id="j0")]).encode())
    out = tmp_path / "conv"
    proc = run_cli(
        "build", "--format", "neo-json", "--annotations", jsonl, doc, "--image-root", images,
        "--output", out, *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = reconciled(out)
    assert (manifest["counts"]["inputs"], manifest["counts"]["written"]) == (4, 4), reasons(manifest)

    for suffix, sep in ((".tsv", "\t"), (".csv", ",")):
        table = tmp_path / f"bom{suffix}"
        rows = [f"image{sep}caption{sep}key"] + [f"{i}.jpg{sep}picture {i}{sep}k{i}" for i in range(3)]
        table.write_bytes(BOM + "\n".join(rows).encode() + b"\n")
        out = tmp_path / f"captions{suffix}"
        proc = run_cli(
            "build", "--format", "captions", "--annotations", table, "--image-root", images, "--output", out,
            "--id-column", "key", *FAST,
        )
        assert proc.returncode == 0, proc.stderr
        manifest = reconciled(out)
        assert (manifest["counts"]["inputs"], manifest["counts"]["written"]) == (3, 3), reasons(manifest)


# ------------------------------------------------------------------------------ NaN and infinities


def test_non_finite_floats_are_written_as_strict_json(tmp_path, images):
    lines = [
        b'{"id": "nan", "score": NaN, "conversations": []}',
        b'{"id": "inf", "weights": [Infinity, -Infinity, 0.5], "image": "0.jpg", "conversations": 7}',
        b'{"id": "ok", "score": NaN, "image": "1.jpg", "conversations": '
        + json.dumps(conv(None)["conversations"]).encode()
        + b"}",
    ]
    ann = write_jsonl(tmp_path / "nan.jsonl", lines)
    out = tmp_path / "out"
    proc = run_cli(
        "build", "--format", "neo-json", "--annotations", ann, "--image-root", images, "--output", out, *FAST
    )
    assert proc.returncode == 0, proc.stderr
    manifest = reconciled(out)  # strict parse of manifest.json and every rejects.jsonl line
    assert manifest["counts"]["written"] == 1
    assert reasons(manifest) == {"empty_conversation": 1, "malformed_conversation": 1}
    rejects = [strict_json(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["record"]["score"] == "NaN"
    assert rejects[1]["record"]["weights"] == ["Infinity", "-Infinity", 0.5]
    assert run_cli("verify", out, "--no-energon").returncode == 0

    # verify refuses a rejects.jsonl that is not strict JSON (as another language's reader would)
    text = (out / "rejects.jsonl").read_text().replace('"NaN"', "NaN", 1)
    (out / "rejects.jsonl").write_text(text)
    proc = run_cli("verify", out, "--no-energon")
    assert proc.returncode == 1 and "rejects.jsonl line 1 is not a reject entry" in proc.stderr


def test_manifest_with_a_non_finite_number_is_strict_json(tmp_path):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"build": {"weight": math.nan, "limits": [math.inf, -math.inf, 1.5]}, "n": 3})
    assert strict_json(path.read_text()) == {
        "build": {"weight": "NaN", "limits": ["Infinity", "-Infinity", 1.5]},
        "n": 3,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
