"""slurm.submit_prep on the local SLURM cluster: a data_prep build as 3 array tasks + a merge gives
the single-machine build (same samples in the same order, byte for byte, same rejects and counts;
verify passes), for neo-json with good and bad records, captions and text. Then the failure case:
one array task cancelled while it runs, the merge never runs, and ``--missing`` resubmits that part
alone with a new merge, which completes with the same result."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.jobs import TERMINAL, array_tasks, job_state, run_command
from slurm.render import PrepSpec
from tests.data_prep.helpers import conv, encode, jpeg, noise_rgb, read_samples, write, write_jsonl
from tests.slurm.helpers import REPO, job_env, run_cli, wait_done

pytestmark = pytest.mark.slow

PARTS = 3
CLUSTER = ["--parts", str(PARTS), "--partition", "debug", "--cpus-per-task", "1", "--time", "10"]
IMAGE_OPTIONS = ["--min-pixels", "1024", "--max-pixels", "65536", "--shard-max-samples", "25"]

# Holds the array task named by NEO_TEST_HOLD_TASK before the build starts, until it is killed: a
# task that is reliably still running when the test cancels it.
HOLD = """\
import os, pathlib, time
_dir = os.environ.get("NEO_TEST_HOLD_DIR")
if _dir and os.environ.get("SLURM_ARRAY_TASK_ID") == os.environ.get("NEO_TEST_HOLD_TASK"):
    pathlib.Path(_dir, f"held-{os.environ['SLURM_ARRAY_TASK_ID']}").touch()
    while True:
        time.sleep(0.2)
"""


def make_inputs(root: Path) -> dict[str, list[str]]:
    """Annotations of three formats over one image folder, good and bad records mixed so that
    every part gets some of each; returns each format's build flags (without --output)."""
    images = root / "images"
    for i in range(24):
        if i % 3:
            write(images / f"{i}.jpg", jpeg(40 + 3 * i, 80 - i, color=(10 * i, 120, 200 - 5 * i)))
        else:
            write(images / f"{i}.jpg", encode(noise_rgb(90 - i, 50 + i, seed=i), "JPEG", quality=80))
    write(images / "broken.jpg", b"not an image at all")
    write(images / "big.png", encode(noise_rgb(400, 300, seed=99), "PNG"))  # resized to the pixel budget

    records: list = []
    for i in range(240):
        image, kind = f"{i % 24}.jpg", i % 10
        if kind in (0, 1, 2):
            records.append(conv(image, id=f"c{i:03d}", answer=f"Answer {i}."))
        elif kind == 3:  # a caption-style record without <image>: the tag is inserted
            records.append(conv(image, question="Describe the picture.", answer=f"A picture, number {i}.",
                                id=f"c{i:03d}"))
        elif kind == 4:  # text-only conversation
            records.append(conv(None, question=f"What is {i} plus one?", answer=f"{i + 1}.", id=f"c{i:03d}"))
        elif kind == 5:
            records.append(conv([image, "big.png"], question="<image>\n<image>\nSame size?", answer="No.",
                                id=f"c{i:03d}"))
        elif kind == 6:  # rejects: a missing image, a broken one, an id used before (in another part)
            bad = ("missing.jpg", "broken.jpg", image)[i // 10 % 3]
            records.append(conv(bad, id=f"c{i:03d}" if bad != image else "c000"))
        elif kind == 7:
            records.append(b'{"id": "cut short", "conversations": [')  # not JSON
        elif kind == 8:
            records.append({"id": f"c{i:03d}", "image": image, "conversations": []})  # empty conversation
        else:
            records.append(conv(image, question="<image>\n<|im_start|>system", id=f"c{i:03d}"))  # reserved
    write_jsonl(root / "neo.jsonl", records)

    with open(root / "captions.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["id", "image", "caption"])
        for i in range(90):
            caption = f"Caption number {i}, a coloured rectangle."
            if i % 9 == 4:
                caption = ""  # empty_text
            elif i % 9 == 7:
                caption = "An <image> tag inside."
            table.writerow([f"k{i:03d}", "missing.jpg" if i % 13 == 5 else f"{i % 24}.jpg", caption])

    texts: list = []
    for i in range(90):
        if i % 11 == 3:
            texts.append({"id": f"t{i:03d}", "text": ""})
        elif i % 11 == 8:
            texts.append({"id": f"t{i:03d}", "text": 42})
        elif i % 17 == 5:
            texts.append(b"not json")
        else:
            texts.append({"id": f"t{i:03d}", "text": f"Plain text document {i}. " * (1 + i % 4)})
    write_jsonl(root / "text.jsonl", texts)

    return {
        "neo-json": ["--format", "neo-json", "--annotations", str(root / "neo.jsonl"), "--image-root",
                     str(images), *IMAGE_OPTIONS],
        "captions": ["--format", "captions", "--annotations", str(root / "captions.csv"), "--image-root",
                     str(images), "--id-column", "id", *IMAGE_OPTIONS],
        "text": ["--format", "text", "--annotations", str(root / "text.jsonl"), "--shard-max-samples", "25"],
    }


def submit_prep(args: list[str], env: dict | None = None) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-m", "slurm.submit_prep", *args], cwd=REPO, env=env or job_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    array_id, merge_id = done.stdout.split()
    return array_id, merge_id


def single_build(flags: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_prep", "build", *flags, "--output", str(out),
                             "--workers", "1", "--no-progress"], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(PrepSpec.default_script_dir(out).glob("*.out")))


def task_states(array_id: str) -> dict[int, str]:
    return {task: info["JobState"] for task, info in array_tasks(array_id).items()}


def assert_same_build(out: Path, ref: Path) -> None:
    got, want = read_samples(out), read_samples(ref)
    assert len(want) > 40
    assert list(got) == list(want), "sample keys or their order differ"
    for key in want:
        assert got[key] == want[key], f"sample {key} differs"
    assert (out / "rejects.jsonl").read_bytes() == (ref / "rejects.jsonl").read_bytes()
    merged, single = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert merged["counts"] == single["counts"]
    assert single["counts"]["rejected"] > 0 and single["counts"]["written"] == len(want)
    done = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def status(out: Path) -> list[dict]:
    done = run_cli("slurm.status", [str(out), "--json"])
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_array_build_and_merge_equal_the_single_build_and_a_cancelled_part_is_resubmitted(
        slurm_cluster, tmp_path):
    started = time.monotonic()
    flags = make_inputs(tmp_path / "in")
    submitted = {}
    for fmt, fmt_flags in flags.items():  # the three builds share the cluster
        concurrency = ["--concurrency", "2"] if fmt == "neo-json" else []
        out = tmp_path / f"{fmt} parts"  # a space: the #SBATCH --output line must quote it
        submitted[fmt] = (out, *submit_prep([*CLUSTER, *concurrency, "--", *fmt_flags, "--output", str(out)]))
    singles = {fmt: single_build(fmt_flags, tmp_path / f"{fmt}-single") for fmt, fmt_flags in flags.items()}
    for fmt, build in singles.items():  # meanwhile, on this machine
        output, _ = build.communicate(timeout=300)
        assert build.returncode == 0, output

    for fmt, (out, array_id, merge_id) in submitted.items():
        info = wait_done(merge_id)
        assert info["JobState"] == "COMPLETED", f"{fmt}: merge {info['JobState']}\n{logs(out)}"
        assert task_states(array_id) == {i: "COMPLETED" for i in range(PARTS)}
        assert sorted(p.name for p in PrepSpec.default_script_dir(out).glob("prep-*.out")) == [
            f"prep-{array_id}_{i}.out" for i in range(PARTS)]  # one log per task
        assert_same_build(out, tmp_path / f"{fmt}-single")
        build_row, merge_row = status(out)
        assert build_row["stage"] == "prep-build" and build_row["task_states"] == {"0": "COMPLETED",
                                                                                   "1": "COMPLETED",
                                                                                   "2": "COMPLETED"}
        assert merge_row == {**merge_row, "stage": "prep-merge", "state": "COMPLETED",
                             "dependency": f"afterok:{array_id}", "parts_complete": PARTS, "merged": True}
    print(f"3 formats as {PARTS} parts + merge: {time.monotonic() - started:.0f}s", file=sys.stderr)

    # The failure case: task 1 is held before it builds anything, then cancelled while it runs.
    neo_flags, reference = flags["neo-json"], tmp_path / "neo-json-single"
    out = tmp_path / "neo-json again"
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(HOLD)
    env = {**job_env(), "PYTHONPATH": str(hold), "NEO_TEST_HOLD_DIR": str(hold), "NEO_TEST_HOLD_TASK": "1"}
    args = [*CLUSTER, "--", *neo_flags, "--output", str(out)]
    array_id, merge_id = submit_prep(args, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (hold / "held-1").exists():
            assert time.monotonic() < deadline, f"task 1 never started\n{logs(out)}"
            assert task_states(array_id).get(1) not in TERMINAL, f"task 1 ended early\n{logs(out)}"
            time.sleep(0.2)
        assert task_states(array_id)[1] == "RUNNING"
        assert run_command(["scancel", f"{array_id}_1"]).returncode == 0
        for task in range(PARTS):
            wait_done(f"{array_id}_{task}")
        assert task_states(array_id) == {0: "COMPLETED", 1: "CANCELLED", 2: "COMPLETED"}
        # The merge never runs: its afterok can no longer be satisfied (SLURM cancels it, or it
        # waits with DependencyNeverSatisfied until --missing cancels it).
        deadline = time.monotonic() + 60
        merge = job_state(merge_id)
        while merge["JobState"] == "PENDING" and merge.get("Reason") != "DependencyNeverSatisfied":
            assert time.monotonic() < deadline, merge
            time.sleep(0.5)
            merge = job_state(merge_id)
        assert merge["JobState"] in ("CANCELLED", "PENDING"), merge
        assert merge.get("StartTime") in (None, "Unknown", "None") or merge.get("NodeList") in ("(null)", "")
        assert not (out / "manifest.json").exists()
        assert not (PrepSpec.default_script_dir(out) / f"merge-{merge_id}.out").exists()
        table = run_cli("slurm.status", [str(out)])
        assert table.returncode == 0, table.stderr
        assert f"{PARTS - 1} of {PARTS} parts complete (incomplete: 1); not merged" in table.stdout, \
            table.stdout

        again = subprocess.run([sys.executable, "-m", "slurm.submit_prep", "--missing", *args], cwd=REPO,
                               env=job_env(), capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        new_array, new_merge = again.stdout.split()
        assert "resubmitting parts 1" in again.stderr
        info = wait_done(new_merge)
        assert info["JobState"] == "COMPLETED", f"merge {info['JobState']}\n{logs(out)}"
        assert task_states(new_array) == {1: "COMPLETED"}  # that part alone
        assert job_state(merge_id)["JobState"] == "CANCELLED"
    finally:
        run_command(["scancel", array_id, merge_id])
    assert_same_build(out, reference)

    rows = status(out)
    assert [(r["job_id"], r["stage"], r["tasks"]) for r in rows] == [
        (array_id, "prep-build", "0-2"), (merge_id, "prep-merge", "-"), (new_array, "prep-build", "1"),
        (new_merge, "prep-merge", "-")]
    assert rows[0]["task_states"] == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}
    assert rows[3]["dependency"] == f"afterok:{new_array}" and rows[3]["state"] == "COMPLETED"
    assert all(r["parts_complete"] == PARTS and r["merged"] for r in rows)
    print(f"with the failure case: {time.monotonic() - started:.0f}s", file=sys.stderr)
