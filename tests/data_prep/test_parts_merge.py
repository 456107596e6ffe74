"""A build spread over parts (`build --parts N --part I`) and merged (`merge OUTPUT`) is the
single build: the same samples in the same order with the same bytes, the same rejects.jsonl,
the same manifest but for the shard list. Re-runs skip complete parts and rebuild half-written
ones; a merge of parts that do not belong together refuses with one line naming the part and
leaves no manifest.json; usage errors are one line with exit code 2.

Real builds of a few hundred mixed inputs (good, missing and corrupt images, two-image and
text-only records, packed entries, malformed lines, duplicate ids across part boundaries) in two
annotation files, through the real command line.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_prep.merge
from data_prep.build import BuildOptions, run_build
from data_prep.cli import main
from data_prep.images import ImageOptions
from data_prep.manifest import BuildStats
from data_prep.parts import PartSlice
from data_prep.progress import Progress
from data_prep.sources import SourceOptions, count_inputs, entries_for
from data_prep.tokenizer import train_tokenizer
from tests.data_prep.helpers import (
    cli,
    conv,
    encode,
    jpeg,
    noise_rgb,
    one_error_line,
    run_cli,
    write,
    write_jsonl,
)

SIZES = ["--min-pixels", "1024", "--max-pixels", "65536", "--shard-max-samples", "8"]
QUIET = ["--no-progress", "--workers", "1"]


# -- inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """neo-json in two files (a JSONL and a JSON list), ~265 inputs; plus small captions and text sets."""
    tmp = tmp_path_factory.mktemp("inputs")
    root = tmp / "images"
    records: list = []
    for i in range(260):
        if i % 13 == 6:
            write(root / f"{i}.jpg", b"not an image at all")  # corrupt_image
        elif i % 11 != 4:  # i % 11 == 4: missing_image
            if i % 5 == 0:
                data = encode(noise_rgb(40 + (i * 7) % 150, 32 + (i * 11) % 120, seed=i), "PNG")
            else:
                data = jpeg(40 + (i * 7) % 150, 32 + (i * 11) % 120, color=(i % 256, 80, 160))
            write(root / f"{i}.jpg", data)
        # Ids repeat: from input ~90 on, every 7th record reuses the id of one ~85 lines earlier
        # (often in an earlier part; sometimes of a record rejected for its image: still claimed).
        rid = f"s{i - 85}" if i > 90 and i % 7 == 0 else f"s{i}"
        if i % 29 == 7:
            records.append(b'{"id": "broken", "conversations": [')  # malformed_json
        elif i % 31 == 8:
            no_answer = [{"from": "human", "value": "<image>\nHi"}]
            records.append({"id": rid, "image": f"{i}.jpg", "conversations": no_answer})
        elif i % 9 == 2:
            records.append(conv(None, question=f"Text only {i}?", answer=f"Plain answer number {i}.", id=rid))
        elif i % 17 == 3:
            records.append(conv([f"{i}.jpg", f"{i - 1}.jpg"], question="<image><image>\nSame?", id=rid))
        elif i % 23 == 10:  # a packed entry: two inputs on one line
            records.append([conv(f"{i}.jpg", id=f"{rid}-a"), conv(f"{i - 2}.jpg", id=f"{rid}-b")])
        else:
            records.append(conv(f"{i}.jpg", id=rid, answer=f"Answer {i} " + "word " * (i % 12)))
    first = write_jsonl(tmp / "a.jsonl", records[:190])
    second = tmp / "b.json"
    second.write_text(json.dumps([r for r in records[190:] if not isinstance(r, bytes)]), encoding="utf-8")
    texts = [f"Answer {i} word" for i in range(50)] + ["What is this? A thing. Same? Hi"]
    tokenizer = train_tokenizer(texts, tmp / "tok", vocab_size=300)

    caps = ["image\tcaption"] + [
        f"{i}.jpg\t{'' if i % 10 == 1 else f'A caption for picture {i}.'}" for i in range(60)
    ]
    caps.insert(20, "7.jpg\tone\tfield too many")
    captions = tmp / "caps.tsv"
    captions.write_text("\n".join(caps) + "\n", encoding="utf-8")
    text = write_jsonl(
        tmp / "text.jsonl",
        [{"id": f"t{i % 50}", "text": "" if i % 8 == 3 else f"Text {i}. " * (1 + i % 5)} for i in range(70)],
    )
    return {
        "root": root,
        "neo": [first, second],
        "tokenizer": tokenizer,
        "captions": captions,
        "text": text,
    }


def build_args(inputs: dict, output: Path, *extra) -> list[str]:
    return [
        "build",
        "--format",
        "neo-json",
        "--annotations",
        *map(str, inputs["neo"]),
        "--image-root",
        str(inputs["root"]),
        "--tokenizer",
        str(inputs["tokenizer"]),
        "--output",
        str(output),
        *SIZES,
        *map(str, extra),
    ]





# -- comparing outputs ----------------------------------------------------------------------------


def samples(directory: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample in data set order (the manifest's shards, then tar order): (key, members)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    out: list[tuple[str, dict[str, bytes]]] = []
    for shard in manifest["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][suffix] = tar.extractfile(member).read()
    return out


def without_shards(manifest: dict) -> str:
    return json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "total_bytes")}, indent=2)


def assert_same_data_set(merged: Path, single: Path) -> tuple[dict, dict]:
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (merged, single))
    assert without_shards(a) == without_shards(b)  # counts, rejects, statistics, build: byte-identical
    assert (merged / "rejects.jsonl").read_bytes() == (single / "rejects.jsonl").read_bytes()
    got, want = samples(merged), samples(single)
    assert [k for k, _ in got] == [k for k, _ in want]
    assert got == want  # every member of every sample, byte for byte
    assert not (merged / "parts").exists()
    return a, b


# -- (a) parts + merge == single build ------------------------------------------------------------


def test_three_parts_merged_are_the_single_build(inputs, tmp_path):
    single, out = tmp_path / "single", tmp_path / "out"
    proc = run_cli(*build_args(inputs, single, "--workers", "2", "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    total = json.loads((single / "manifest.json").read_text())["counts"]["inputs"]
    assert total > 250

    # The three parts at once, as array tasks start: all create OUTPUT and OUTPUT/parts.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_prep", *build_args(inputs, out, "--parts", 3, "--part", i)]
            + ["--workers", str(1 + i % 2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    part_manifests = []
    for i, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert stdout.splitlines()[-1].startswith(f"data_prep part {i}/3 (inputs [{i * total // 3}, ")
        directory = out / "parts" / f"part-{i:05d}"
        assert not (directory / ".nv-meta").exists() and not list(directory.glob("*.idx"))
        part_manifests.append(json.loads((directory / "manifest.json").read_text()))
    assert not (out / "manifest.json").exists()
    slices = [(m["part"]["first_input"], m["part"]["end_input"]) for m in part_manifests]
    assert slices == [(i * total // 3, (i + 1) * total // 3) for i in range(3)]
    assert all(m["part"]["total_inputs"] == total and m["part"]["parts"] == 3 for m in part_manifests)
    # Part 2 rejects duplicates of keys first used in parts 0 and 1 (which it reads, without images).
    assert part_manifests[2]["rejects"]["duplicate_key"] > 0

    merged = run_cli("merge", out)
    assert merged.returncode == 0, merged.stderr
    summary = merged.stdout.strip().splitlines()[-1]
    assert re.match(rf"data_prep merge: 3 parts, {total} inputs = \d+ written \+ \d+ rejected \(", summary)
    assert "shard(s)" in summary and " MB " in summary and " s -> " in summary
    a, b = assert_same_data_set(out, single)
    assert a["stats"]["text_tokens_per_sample"]["count"] > 0  # the tokenizer's histogram merged too

    # Duplicates across part boundaries are rejected as in the single build (same rejects.jsonl).
    bounds = [end for _, end in slices]
    part_of = lambda index: next(p for p, end in enumerate(bounds) if index < end)  # noqa: E731
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    crossing = {  # duplicate's input index -> the input index that claimed the key first
        r["index"]: int(re.search(r"input #(\d+)", r["message"]).group(1))
        for r in rejects
        if r["reason"] == "duplicate_key"
    }
    crossing = {dup: first for dup, first in crossing.items() if part_of(dup) != part_of(first)}
    assert len(crossing) >= 3
    # A key is claimed by its first input even when that input is then rejected for its image.
    reason = {r["index"]: r["reason"] for r in rejects}
    assert any(reason.get(first) == "missing_image" for first in crossing.values())

    # Shard boundaries differ: each part ends its last shard early, so the merged set has its own
    # shard list (same samples, same order); every shard keeps its part's sha256.
    assert sum(s["samples"] for s in a["shards"]) == sum(s["samples"] for s in b["shards"])
    assert [s["samples"] for s in a["shards"]] != [s["samples"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for m in part_manifests for s in m["shards"]]
    assert [s["name"] for s in a["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(a["shards"]))]

    verified = run_cli("verify", out)
    assert verified.returncode == 0, verified.stderr

    # The trainer's loader reads the merged set through Energon (its metadata prepared by the merge).
    from pretrain.data.loader import TrainLoader

    loader = TrainLoader(path=str(out), tokenizer_path=str(inputs["tokenizer"]), seq_len=1024,
                         micro_batch_size=2, num_workers=0, shuffle_buffer=0)
    written = {key for key, _ in samples(out)}
    for _ in range(3):
        next(loader)
        seen = {key.rpartition(":")[2] for row in loader.last.keys for key in row}
        assert seen and seen <= written, seen - written
    assert loader.totals.samples > 0


def test_captions_and_text_parts_merged_are_the_single_build(inputs, tmp_path, capsys):
    cases = {
        "captions": ["--format", "captions", "--annotations", inputs["captions"], 
                     "--image-root", inputs["root"]],
        "text": ["--format", "text", "--annotations", inputs["text"]],
    }
    for name, args in cases.items():
        single, out = tmp_path / f"{name}-single", tmp_path / f"{name}-out"
        common = ["build", *args, *SIZES, *QUIET, "--no-energon"]
        assert cli(capsys, *common, "--output", single)[0] == 0
        for i in range(3):
            assert cli(capsys, *common, "--output", out, "--parts", 3, "--part", i)[0] == 0
        code, stdout, err = cli(capsys, "merge", out, "--no-energon")
        assert code == 0, err
        manifest, _ = assert_same_data_set(out, single)
        assert manifest["counts"]["rejected"] > 0
        assert cli(capsys, "verify", out, "--no-energon")[0] == 0


def test_more_parts_than_inputs(inputs, tmp_path, capsys):
    """Empty slices are parts too (N > T): they hold no shard and merge to nothing."""
    ann = write_jsonl(tmp_path / "two.jsonl", [conv(None, question="Q?", id="x"), {"id": "y", "text": 5}])
    common = ["build", "--format", "neo-json", "--annotations", ann, *SIZES, *QUIET, "--no-energon"]
    assert cli(capsys, *common, "--output", tmp_path / "single")[0] == 0
    for i in range(5):
        assert cli(capsys, *common, "--output", tmp_path / "out", "--parts", 5, "--part", i)[0] == 0
    assert cli(capsys, "merge", tmp_path / "out")[0] == 0  # one shard: Energon prepared
    assert_same_data_set(tmp_path / "out", tmp_path / "single")


def test_count_inputs_is_the_number_of_entries(inputs, tmp_path):
    """T: the counting pass agrees with the entries themselves in every format (parquet from its metadata)."""
    table = pa.table({"image": ["0.jpg", None, "x.jpg"], "caption": ["a", "b", ""]})
    pq.write_table(table, tmp_path / "c.parquet")
    cases = [
        ("neo-json", inputs["neo"]),
        ("captions", [inputs["captions"], tmp_path / "c.parquet"]),
        ("text", [inputs["text"]]),
    ]
    for fmt, paths in cases:
        entries = list(entries_for(fmt, paths, SourceOptions()))
        assert [e.index for e in entries] == list(range(len(entries)))
        assert count_inputs(fmt, paths, SourceOptions()) == len(entries)


# -- (b) re-runs ----------------------------------------------------------------------------------


def test_rerun_skips_complete_parts_and_rebuilds_half_written_ones(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    parts = [out / "parts" / f"part-{i:05d}" for i in range(3)]

    def part(i, *extra):
        return cli(capsys, *build_args(inputs, out, *QUIET, "--parts", 3, "--part", i, *extra))

    for i in range(3):
        assert part(i)[0] == 0
    built = {i: (p / "manifest.json").read_bytes() for i, p in enumerate(parts)}
    stamps = {p.name: p.stat().st_mtime_ns for p in parts[1].iterdir()}

    code, stdout, _ = part(1)
    assert code == 0 and stdout.strip() == (
        f"data_prep build: part 1/3 is already complete in {parts[1]} "
        "(same inputs, options and environment); skipped"
    )
    assert {p.name: p.stat().st_mtime_ns for p in parts[1].iterdir()} == stamps  # nothing rewritten

    # Killed before its manifest (and mid-shard): rebuilt from scratch, to the same bytes.
    (parts[0] / "manifest.json").unlink()
    (parts[0] / ".shard-000009.tar.partial").write_bytes(b"half a shard")
    code, stdout, _ = part(0)
    assert code == 0 and "half-written" in stdout and "rebuilding it from scratch" in stdout
    assert (parts[0] / "manifest.json").read_bytes() == built[0]
    assert not list(parts[0].glob(".*.partial"))

    # A truncated manifest, then a truncated shard: not complete, so rebuilt as well.
    text = (parts[2] / "manifest.json").read_text()
    (parts[2] / "manifest.json").write_text(text[: len(text) // 2])
    code, stdout, _ = part(2)
    assert code == 0 and "half-written" in stdout and (parts[2] / "manifest.json").read_bytes() == built[2]
    shard = parts[2] / "shard-000001.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    code, stdout, _ = part(2)
    assert code == 0 and "damaged: shard-000001.tar is" in stdout and shard.stat().st_size == size

    # A complete part of another build: refused unless --overwrite.
    code, _, err = part(1, "--max-pixels", "16384")
    line = one_error_line(err, "build")
    assert code == 2 and "image.max_pixels: 16384 in this build, 65536 in the part there" in line
    assert "--overwrite" in line and (parts[1] / "manifest.json").read_bytes() == built[1]

    # Merged: OUTPUT holds a data set, which a part build does not touch without --overwrite.
    assert cli(capsys, "merge", out, "--no-energon")[0] == 0
    code, _, err = part(0)
    assert code == 2 and "already holds a merged data set" in one_error_line(err, "build")
    assert (out / "manifest.json").is_file()
    # --overwrite: the parts are built again; OUTPUT stops looking complete at once, and the merge
    # replaces the old data set without asking again.
    code, stdout, _ = part(0, "--overwrite", "--max-pixels", "16384")
    assert code == 0 and not (out / "manifest.json").exists() and (out / "shard-000000.tar").exists()
    for i in (1, 2):
        assert part(i, "--max-pixels", "16384")[0] == 0
    assert cli(capsys, "merge", out, "--no-energon")[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["image"]["max_pixels"] == 16384
    assert cli(capsys, "verify", out, "--no-energon")[0] == 0


# -- (c) merge refuses parts that do not make one build --------------------------------------------


@pytest.fixture(scope="module")
def good_parts(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    for i in range(3):
        assert main(build_args(inputs, out, *QUIET, "--parts", 3, "--part", i)) == 0
    return out


def broken(good_parts: Path, tmp_path: Path, inputs: dict, capsys, case: str) -> Path:
    out = tmp_path / "out"
    shutil.copytree(good_parts, out)
    parts = out / "parts"
    if case == "missing":
        shutil.rmtree(parts / "part-00001")
    elif case == "options":
        shutil.rmtree(parts / "part-00001")
        args = build_args(inputs, out, *QUIET, "--parts", 3, "--part", 1, "--max-pixels", 16384)
        assert cli(capsys, *args)[0] == 0
    elif case == "half-written":
        (parts / "part-00002" / "manifest.json").unlink()
    elif case == "inputs":
        other = tmp_path / "other"
        other.mkdir()
        shutil.copy(inputs["neo"][1], other / "b.json")
        lines = inputs["neo"][0].read_bytes().splitlines(keepends=True)
        (other / "a.jsonl").write_bytes(b"".join(lines[:-1]))  # one record less
        args = build_args({**inputs, "neo": [other / "a.jsonl", other / "b.json"]}, out, *QUIET)
        assert cli(capsys, *args, "--parts", 3, "--part", 1, "--overwrite")[0] == 0
    elif case == "parts":
        shutil.rmtree(parts / "part-00001")
        assert cli(capsys, *build_args(inputs, out, *QUIET, "--parts", 4, "--part", 1))[0] == 0
    elif case == "truncated-shard":
        shard = parts / "part-00000" / "shard-000000.tar"
        with open(shard, "r+b") as f:
            f.truncate(1024)
    elif case == "symlinked-shard":  # a file outside, of the very size the manifest says
        shard = parts / "part-00000" / "shard-000000.tar"
        outside = tmp_path / "secret.tar"
        outside.write_bytes(b"x" * shard.stat().st_size)
        shard.unlink()
        shard.symlink_to(outside)
    return out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"part 1/3 \(\S+/parts/part-00001\): missing; build it again with --parts 3 --part 1$"),
        (
            "options",
            r"part 1/3 \(\S+/part-00001\): built with other options \(image\.max_pixels: 16384 in part 1, "
            r"65536 in part 0\)",
        ),
        ("half-written", r"part 2/3 \(\S+/part-00002\): half-written \(no manifest\.json"),
        (
            "inputs",
            r"part 1/3 \(\S+\): built with other inputs "
            r"\(\[a\.jsonl sha256 \w+, b\.json sha256 \w+\] in part 1",
        ),
        ("parts", r"part 1/3 \(\S+\): built with another number of parts \(4 in part 1, 3 in part 0\)"),
        (
            "truncated-shard",
            r"part 0/3 \(\S+\): damaged: shard-000000\.tar is 1024 bytes, its manifest says \d+ bytes",
        ),
        ("symlinked-shard", r"part 0/3 \(\S+\): damaged: shard-000000\.tar is a symbolic link"),
    ],
    ids=["missing", "options", "half-written", "inputs", "parts", "truncated-shard", "symlinked-shard"],
)
def test_merge_refuses_parts_that_do_not_make_one_build(good_parts, tmp_path, inputs, capsys, case, expected):
    out = broken(good_parts, tmp_path, inputs, capsys, case)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, stdout, err = cli(capsys, "merge", out)
    assert code == 1
    line = one_error_line(err, "merge")
    assert re.search(expected, line), line
    assert not (out / "manifest.json").exists()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched


def test_merge_without_parts(tmp_path, capsys):
    code, _, err = cli(capsys, "merge", tmp_path / "nowhere")
    assert code == 1 and "nothing to merge" in one_error_line(err, "merge")


# -- a merge that dies is run again; file systems without hard links --------------------------------


def test_merge_rerun_after_a_crash_and_without_hard_links(good_parts, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(good_parts, out)
    single = tmp_path / "single"
    assert cli(capsys, *build_args(inputs, single, *QUIET, "--no-energon"))[0] == 0

    # Dies half way (disk full while writing rejects.jsonl): nothing looks complete, parts intact.
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_prep.merge, "_concatenate_rejects", disk_full)
    code, _, err = cli(capsys, "merge", out, "--no-energon")
    assert code == 1 and "the merge did not finish" in one_error_line(err, "merge")
    assert not (out / "manifest.json").exists() and (out / "parts").is_dir()
    assert (out / ".merge.partial" / "shard-000000.tar").is_file()
    monkeypatch.undo()

    # Run again, on a file system without hard links: the leftovers go, the shards are copied.
    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(data_prep.merge.os, "link", no_links)
    code, stdout, _ = cli(capsys, "merge", out, "--no-energon")
    monkeypatch.undo()
    assert code == 0 and "copied (no hard links here)" in stdout
    assert_same_data_set(out, single)
    assert cli(capsys, "verify", out, "--no-energon")[0] == 0

    # Died after manifest.json, before parts/ was removed: the rerun only removes parts/.
    shutil.copytree(good_parts / "parts", out / "parts")
    code, stdout, _ = cli(capsys, "merge", out, "--no-energon")
    assert code == 0 and "already merged, removed" in stdout
    assert_same_data_set(out, single)
    code, stdout, _ = cli(capsys, "merge", out)
    assert code == 0 and "nothing to do" in stdout

    # Merged but parts/ only partly removed (renamed first, so no rerun takes it for parts).
    shutil.copytree(good_parts / "parts", out / "parts")
    real_rmtree = shutil.rmtree

    def fails_on_parts(path, *args, **kwargs):
        if Path(path).name == ".parts.partial":
            raise OSError(errno.EIO, "Input/output error")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(data_prep.merge.shutil, "rmtree", fails_on_parts)
    code, stdout, _ = cli(capsys, "merge", out, "--no-energon")
    monkeypatch.undo()
    assert code == 0 and "could not remove" in stdout and (out / ".parts.partial").is_dir()
    code, stdout, _ = cli(capsys, "merge", out, "--no-energon")
    assert code == 0 and "removed" in stdout and not (out / ".parts.partial").exists()
    assert cli(capsys, "verify", out, "--no-energon")[0] == 0


# -- (d) usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--part", "1"], "--parts N and --part I go together"),
        (["--parts", "3"], "--parts N and --part I go together"),
        (["--parts", "3", "--part", "3"], "--part must be in 0..2 for --parts 3, got 3"),
        (["--parts", "2", "--part", "-1"], "--part must be in 0..1 for --parts 2, got -1"),
        (["--parts", "0", "--part", "0"], "--parts must be an integer in 1..100000, got 0"),
    ],
    ids=["part-alone", "parts-alone", "part-too-big", "part-negative", "zero-parts"],
)
def test_part_usage_errors(inputs, tmp_path, capsys, extra, message):
    code, _, err = cli(capsys, *build_args(inputs, tmp_path / "out", *QUIET, *extra))
    assert code == 2 and message in one_error_line(err, "build")
    assert not (tmp_path / "out").exists()


def test_a_part_being_built_is_not_built_twice_at_once(inputs, tmp_path, capsys):
    """Two builds of one part at the same time would write one directory: the second is refused
    while the first holds the part's lock, and runs once it is released."""
    out = tmp_path / "out"
    args = build_args(inputs, out, *QUIET, "--no-energon", "--parts", "3", "--part", "1")
    (out / "parts").mkdir(parents=True)
    with open(out / "parts" / ".part-00001.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build of part 1 holds it
        code, _, err = cli(capsys, *args)
        assert code == 1
        assert "part 1/3 is being built right now by another process" in one_error_line(err, "build")
        assert not (out / "parts" / "part-00001").exists()
    assert cli(capsys, *args)[0] == 0
    assert (out / "parts" / "part-00001" / "manifest.json").is_file()


# -- progress in a log ------------------------------------------------------------------------------


def test_plain_progress_lines_when_not_a_terminal(tmp_path, capsys):
    stream = io.StringIO()
    with Progress("part 2/3", 4, None, interval=0, stream=stream) as progress:
        for rejected in (False, True, False):
            progress.update(rejected)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"part 2/3: 3/4 inputs \(75%\), \d+ samples/s, 1 rejected", lines[-1])

    # Through a part build, stderr being a file as in a SLURM log.
    records = [{"id": f"t{i}", "text": f"x {i}" if i % 4 else ""} for i in range(12)]
    ann = write_jsonl(tmp_path / "t.jsonl", records)
    part = PartSlice(2, 3, 12)
    options = BuildOptions(image=ImageOptions(), progress=None, progress_interval=0, energon=False)
    entries = entries_for("text", [ann], SourceOptions())
    run_build(entries, tmp_path / "p", options, {"command": "test"}, describe=part.label, part=part)
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"part 2/3: 4/4 inputs \(100%\), \d+ samples/s, 1 rejected", err[-1]), err
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["part"]["first_input"] == 8


def test_raw_statistics_merge_exactly():
    """Percentiles cannot be merged from summaries; the parts' histograms can, exactly."""
    values = [(i * 37) % 101 for i in range(300)]
    whole, parts = BuildStats(), [BuildStats() for _ in range(3)]
    for i, v in enumerate(values):
        for stats in (whole, parts[i * 3 // len(values)]):
            stats.add_written("caption", [v, v // 2], v % 7 or None, v * 3, v, v % 5 == 0)
    merged = BuildStats()
    for stats in parts:
        merged.update(BuildStats.from_raw(json.loads(json.dumps(stats.to_raw()))))
    assert merged.to_raw() == whole.to_raw()
    for name in BuildStats.DISTRIBUTIONS:
        assert getattr(merged, name).summary() == getattr(whole, name).summary()
    raw = whole.to_raw()
    raw["histograms"]["images_per_sample"] = {"two": 1}
    with pytest.raises(ValueError):
        BuildStats.from_raw(raw)
