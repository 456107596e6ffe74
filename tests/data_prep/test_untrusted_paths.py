"""Untrusted annotations never make a build read outside the image root, hang, or leak data.

Real builds through the real CLI entry (data_prep.cli.main) on real files, real symlinks and real
FIFOs. Every build must exit 0, reject the hostile input with the right reason, reconcile
(inputs = written + rejected), write none of the outside file's bytes into a shard and say nothing
in rejects.jsonl about the outside file's content or size.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from data_prep import process
from data_prep.cli import main
from data_prep.images import max_image_file_bytes
from data_prep.process import read_image
from data_prep.rejects import REASONS, Reject
from tests.data_prep.helpers import build, conv, jpeg, read_rejects, sample_json, write, write_jsonl

MARKER = b"SECRET-MARKER-7f3a9c2e51d04b68"


def secret_png() -> bytes:
    """A real, decodable photo carrying the marker in a text chunk (and its pixels are distinctive)."""
    import io

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKER.decode())
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """tmp/data/{ann files, images/ (the root)} and tmp/outside/ (must never be read)."""
    data = tmp_path / "data"
    root = data / "images"
    write(root / "good.jpg", jpeg(96, 64))
    write(root / "sub" / "good2.jpg", jpeg(64, 64, color=(0, 200, 0)))
    outside = tmp_path / "outside"
    write(outside / "secret_photo.png", secret_png())
    # like /etc/passwd: a text file whose size the old report gave away ("not a recognised image (N bytes")
    write(outside / "passwd", b"root:x:0:0:" + MARKER + b":/root:/bin/bash\n" * 30)
    return {"data": data, "root": root, "outside": outside, "tmp": tmp_path}


def cli_build(tree, records, *extra, annotations=None, fmt="neo-json") -> Path:
    ann = annotations or write_jsonl(tree["data"] / "ann.jsonl", records)
    out = tree["tmp"] / "out"
    rc = main(
        [
            "build",
            "--format",
            fmt,
            "--annotations",
            str(ann),
            "--image-root",
            str(tree["root"]),
            "--output",
            str(out),
            "--workers",
            "1",
            "--no-progress",
            "--no-energon",
            "--min-pixels",
            "1024",
            "--max-pixels",
            "65536",
            *extra,
        ]
    )
    assert rc == 0
    return out


def check(out: Path, written: set[str], rejected: dict[str, str], secrets: list[Path]) -> list[dict]:
    """Exit 0 already checked; now reasons, reconciliation, no secret bytes, no size/content."""
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["inputs"] == counts["written"] + counts["rejected"] and counts["reconciled"]
    assert (counts["written"], counts["rejected"]) == (len(written), len(rejected))
    rejects = read_rejects(out)
    assert {r["id"]: r["reason"] for r in rejects} == rejected
    assert {s["id"] for s in sample_json(out)} == written
    expected_counts = {code: 0 for code in REASONS}
    for reason in rejected.values():
        expected_counts[reason] += 1
    assert manifest["rejects"] == expected_counts
    shards = sorted(out.glob("*.tar"))
    assert shards or not written
    report = (out / "rejects.jsonl").read_bytes()
    for shard in shards:
        assert MARKER not in shard.read_bytes()
    assert MARKER not in report
    sizes = {str(p.stat().st_size) for p in secrets if p.exists()}
    for r in rejects:
        message = r["message"]
        assert "bytes" not in message and not any(size in message for size in sizes), message
    return rejects


@pytest.mark.timeout(60)
def test_dotdot_traversal(tree):
    out = cli_build(
        tree,
        [
            conv("good.jpg", id="ok"),
            conv("../../outside/secret_photo.png", id="up-photo"),
            conv("../../outside/passwd", id="up-passwd"),
            conv("sub/../../../outside/secret_photo.png", id="down-then-up"),
            conv(["good.jpg", "../../outside/secret_photo.png"], question="<image><image>x", id="second"),
            conv("sub/../good.jpg", id="ok-dotdot-inside"),  # '..' that stays inside is fine
        ],
    )
    rejects = check(
        out,
        {"ok", "ok-dotdot-inside"},
        {k: "image_outside_root" for k in ("up-photo", "up-passwd", "down-then-up", "second")},
        [tree["outside"] / "secret_photo.png", tree["outside"] / "passwd"],
    )
    by_id = {r["id"]: r["message"] for r in rejects}
    assert by_id["up-passwd"].startswith("../../outside/passwd: ")  # the path as given, nothing resolved
    assert str(tree["outside"]) not in json.dumps(by_id)
    assert by_id["second"].startswith("image 1: ")


@pytest.mark.timeout(60)
def test_absolute_path(tree):
    secret = tree["outside"] / "secret_photo.png"
    inside = tree["root"] / "sub" / "good2.jpg"
    out = cli_build(
        tree,
        [
            conv(str(secret), id="abs-outside"),
            conv(str(tree["root"]) + "/../outside/secret_photo.png", id="abs-root-then-up"),
            conv("/etc/passwd", id="abs-etc"),
            # decided: an absolute path that resolves INSIDE the root is accepted
            conv(str(inside), id="abs-inside"),
        ],
    )
    check(
        out,
        {"abs-inside"},
        {k: "image_outside_root" for k in ("abs-outside", "abs-root-then-up", "abs-etc")},
        [secret, Path("/etc/passwd")],
    )


@pytest.mark.timeout(60)
def test_symlink_inside_root_pointing_outside(tree):
    root, outside = tree["root"], tree["outside"]
    os.symlink(outside / "secret_photo.png", root / "abs_link.png")  # absolute target
    os.symlink("../../outside/secret_photo.png", root / "rel_link.png")  # relative target
    os.symlink(outside, root / "outdir")  # a directory link: every path through it leaves
    os.symlink(outside / "passwd", root / "sub" / "passwd.jpg")
    os.symlink("good2.jpg", root / "sub" / "inside_link.jpg")  # stays inside: accepted
    out = cli_build(
        tree,
        [
            conv("abs_link.png", id="abs-link"),
            conv("rel_link.png", id="rel-link"),
            conv("outdir/secret_photo.png", id="dir-link"),
            conv("sub/passwd.jpg", id="passwd-link"),
            conv("sub/inside_link.jpg", id="ok-inside-link"),
        ],
    )
    rejects = check(
        out,
        {"ok-inside-link"},
        {k: "image_outside_root" for k in ("abs-link", "rel-link", "dir-link", "passwd-link")},
        [outside / "secret_photo.png", outside / "passwd"],
    )
    for r in rejects:  # the message names the link as given, never its target
        assert str(outside) not in r["message"] and "outside/" not in r["message"]


@pytest.mark.timeout(60)
def test_dev_zero(tree):
    out = cli_build(tree, [conv("good.jpg", id="ok"), conv("/dev/zero", id="zero")])
    check(out, {"ok"}, {"zero": "image_outside_root"}, [])


@pytest.mark.timeout(60)
def test_device_inside_the_root_is_never_opened(tree):
    """With /dev itself as the image root, 'zero' is inside it: refused from its stat, not read."""
    ann = write_jsonl(tree["data"] / "dev.jsonl", [conv("zero", id="zero"), conv("null", id="null")])
    out = tree["tmp"] / "out"
    args = ["build", "--format", "neo-json", "--annotations", str(ann), "--image-root", "/dev"]
    assert main([*args, "--output", str(out), "--workers", "1", "--no-progress", "--no-energon"]) == 0
    rejects = check(out, set(), {"zero": "not_a_regular_file", "null": "not_a_regular_file"}, [])
    assert all("character device" in r["message"] for r in rejects)


@pytest.mark.timeout(60)
def test_fifo_inside_root(tree):
    root = tree["root"]
    os.mkfifo(root / "pipe.jpg")
    os.symlink("pipe.jpg", root / "pipe_link.jpg")
    out = cli_build(
        tree,
        [conv("good.jpg", id="ok"), conv("pipe.jpg", id="fifo"), conv("pipe_link.jpg", id="fifo-link")],
    )
    rejects = check(out, {"ok"}, {"fifo": "not_a_regular_file", "fifo-link": "not_a_regular_file"}, [])
    assert all("FIFO" in r["message"] for r in rejects)


@pytest.mark.timeout(60)
def test_file_swapped_for_a_fifo_after_the_check_does_not_hang(tree, monkeypatch):
    """The stat says 'regular file' (as if it was one a moment ago); the open must not block on the
    FIFO that is there now, and the fstat of the opened descriptor must refuse it."""
    root = tree["root"]
    os.mkfifo(root / "swapped.jpg")
    real_stat = os.stat
    good = real_stat(root / "good.jpg")

    def fake_stat(path, *args, **kwargs):
        return good if str(path).endswith("swapped.jpg") else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(process.os, "stat", fake_stat)
    with pytest.raises(Reject) as info:
        read_image("swapped.jpg", str(root))
    assert info.value.code == "not_a_regular_file"


@pytest.mark.timeout(60)
def test_outside_file_that_exists_and_one_that_does_not_read_the_same(tree):
    root, outside = tree["root"], tree["outside"]
    os.symlink(outside / "secret_photo.png", root / "link_exists.png")
    os.symlink(outside / "nothing_here.png", root / "link_nothing.png")
    pairs = {
        "rel": ("../../outside/secret_photo.png", "../../outside/nothing_here.png"),
        "abs": (str(outside / "secret_photo.png"), str(outside / "nothing_here.png")),
        "link": ("link_exists.png", "link_nothing.png"),
    }
    records = []
    for name, (exists, missing) in pairs.items():
        records += [conv(exists, id=f"{name}-exists"), conv(missing, id=f"{name}-missing")]
    out = cli_build(tree, records)
    rejects = check(
        out, set(), {r["id"]: "image_outside_root" for r in records}, [outside / "secret_photo.png"]
    )
    by_id = {r["id"]: r["message"] for r in rejects}
    for name, (exists, missing) in pairs.items():
        said_exists = by_id[f"{name}-exists"].replace(exists, "PATH")
        assert said_exists == by_id[f"{name}-missing"].replace(missing, "PATH")


@pytest.mark.timeout(60)
def test_caption_tsv_with_a_traversal_path(tree):
    tsv = tree["data"] / "caps.tsv"
    tsv.write_bytes(
        b"image\tcaption\n"
        b"good.jpg\tA red rectangle.\n"
        b"../../outside/secret_photo.png\tA secret.\n"
        + str(tree["outside"] / "secret_photo.png").encode()
        + b"\tAn absolute secret.\n"
    )
    out = cli_build(tree, None, annotations=tsv, fmt="captions")
    check(
        out,
        {"caps.tsv:0"},
        {"caps.tsv:1": "image_outside_root", "caps.tsv:2": "image_outside_root"},
        [tree["outside"] / "secret_photo.png"],
    )


@pytest.mark.timeout(60)
def test_caption_parquet_paths_follow_the_rule_and_embedded_bytes_do_not_change(tree):
    table = pa.table(
        {
            "image": [
                {"bytes": jpeg(64, 64), "path": None},  # embedded: no file involved
                {"bytes": None, "path": "../../outside/secret_photo.png"},
                {"bytes": None, "path": "sub/good2.jpg"},
            ],
            "caption": ["Embedded.", "Traversal.", "A path inside."],
        }
    )
    pq.write_table(table, tree["data"] / "caps.parquet")
    out = cli_build(tree, None, annotations=tree["data"] / "caps.parquet", fmt="captions")
    check(
        out,
        {"caps.parquet:0", "caps.parquet:2"},
        {"caps.parquet:1": "image_outside_root"},
        [tree["outside"] / "secret_photo.png"],
    )


@pytest.mark.timeout(60)
def test_file_over_the_byte_limit_is_rejected_unread(tree):
    limit = max_image_file_bytes(1_000_000)
    with open(tree["root"] / "huge.png", "wb") as f:  # sparse: costs no disk
        f.truncate(limit + 1)
    out = cli_build(
        tree, [conv("good.jpg", id="ok"), conv("huge.png", id="huge")], "--max-image-pixels", "1000000"
    )
    (reject,) = check(out, {"ok"}, {"huge": "image_too_large"}, [tree["root"] / "huge.png"])
    assert str(limit) in reject["message"]  # the limit, never the file's own size


def test_a_file_whose_size_lies_is_still_bounded():
    """/proc files report size 0; the read stops at the limit + 1 byte and rejects."""
    maps = Path("/proc/self/maps")
    if not maps.exists() or os.stat(maps).st_size != 0:
        pytest.skip("needs Linux /proc")
    with pytest.raises(Reject) as info:
        read_image("maps", "/proc/self", max_bytes=16)
    assert info.value.code == "image_too_large"
    assert stat.S_ISREG(os.stat(maps).st_mode)


def test_no_image_root_reads_no_file(tree, tmp_path):
    """image_root=None (the library default; the CLI always sets a root) refuses every path."""
    good = str(tree["root"] / "good.jpg")
    for ref in ("good.jpg", good, "../x.jpg"):
        with pytest.raises(Reject) as info:
            read_image(ref, None)
        assert info.value.code == "image_outside_root"
    ann = write_jsonl(tmp_path / "a.jsonl", [conv(good, id="abs"), conv("images/good.jpg", id="rel")])
    manifest = build("neo-json", [ann], tmp_path / "out")
    assert manifest["counts"]["written"] == 0 and manifest["rejects"]["image_outside_root"] == 2


@pytest.mark.timeout(60)
def test_nul_in_a_path_rejects_instead_of_crashing(tree):
    out = cli_build(tree, [conv("good.jpg", id="ok"), conv("good.jpg\u0000../../x", id="nul")])
    check(out, {"ok"}, {"nul": "missing_image"}, [])
