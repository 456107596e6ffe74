"""Smoke test of `make bench` (not a benchmark: nothing here judges a timing).

Runs ``python -m bench --quick`` end to end at toy sizes (data path, model step, the GPU section,
which on a machine without CUDA is skipped after running its code path on CPU, and checkpoint)
and checks that the results files are written in the agreed format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"name", "value", "unit", "baseline_value", "ratio", "notes"}


@pytest.mark.slow
def test_bench_quick_writes_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert rows and all(set(r) == FIELDS for r in rows)
    names = [r["name"] for r in rows]
    for prefix in ("data/shard build", "data/loader", "data/pack fill", "model/text", "model/multimodal", "attention/", "gpu/",
                   "checkpoint/save", "checkpoint/load"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    for r in rows:
        if r["name"].startswith("gpu/") and r["value"] is None:
            assert r["notes"].startswith("skipped: ")
            continue
        assert r["value"] is not None and r["value"] > 0, r
        if r["baseline_value"] is not None:
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
    table = (out / "results.md").read_text()
    assert "| measurement | ours | unit | baseline | ratio | notes |" in table
    assert "| measurement |" in proc.stdout  # the table is printed too
