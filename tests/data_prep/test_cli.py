"""The command line end to end, as a user runs it: build -> summary line -> verify -> Energon."""

import json
import subprocess
import sys

from tests.data_prep.energon_reader import read_with_energon
from tests.data_prep.helpers import conv, jpeg, write, write_jsonl


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, timeout=300
    )


def test_build_verify_cli(tmp_path):
    root = tmp_path / "images"
    for i in range(6):
        write(root / "sub" / f"{i}.jpg", jpeg(120 + 10 * i, 90, color=(30 * i, 90, 160)))
    write(root / "sub" / "bad.jpg", b"\x00" * 10)
    ann = write_jsonl(
        tmp_path / "llava.jsonl",
        [conv(f"sub/{i}.jpg", id=f"id{i}") for i in range(6)] + [conv("sub/bad.jpg", id="bad")],
    )
    out = tmp_path / "shards"
    proc = run(
        "build",
        "--format",
        "neo-json",
        "--annotations",
        str(ann),
        "--image-root",
        str(root),
        "--output",
        str(out),
        "--workers",
        "2",
        "--shard-max-samples",
        "4",
        "--min-pixels",
        "4096",
        "--max-pixels",
        "65536",
    )
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("data_prep: 7 inputs = 6 written + 1 rejected (corrupt_image 1); 2 shard(s)")
    assert "samples/s" in summary and "MB/s" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["annotations"][0]["name"] == "llava.jsonl"
    assert manifest["build"]["image"]["min_pixels"] == 4096
    assert "workers" not in json.dumps(manifest)  # how the work ran is not part of the result
    verified = run("verify", str(out))
    assert verified.returncode == 0 and "6 samples" in verified.stdout
    assert len(read_with_energon(out)) == 6
    again = run(
        "build",
        "--format",
        "neo-json",
        "--annotations",
        str(ann),
        "--image-root",
        str(root),
        "--output",
        str(out),
        "--no-energon",
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
