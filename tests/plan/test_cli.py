"""python -m pretrain.plan as a user runs it: the table, --json, --current, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.slurm.helpers import REPO

TINY = ["model=tiny", "train.seq_len=1024", "train.global_batch_size=16", "cluster=h100_80gb",
        "cluster.gpus_per_node=4"]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def layouts() -> list[dict]:
    done = plan(*TINY, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_json_lists_every_valid_layout_best_first(layouts):
    # 4 GPUs, 6 layers, 2 KV heads: TP 1 or 2 (TP4 cannot split 2 KV groups) x PP dividing 4/TP, each
    # with the micro-batch sizes whose global batch divides, x 3 recompute modes: training's validation.
    seen = {(p["tp"], p["pp"], p["dp"], p["micro_batch_size"], p["recompute"]) for p in layouts}
    assert len(seen) == len(layouts)
    assert {(tp, pp) for tp, pp, *_ in seen} == {(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)}
    assert {r for *_, r in seen} == {"none", "selective", "full"}
    for p in layouts:
        assert p["tp"] * p["pp"] * p["dp"] == 4 and 16 % (p["micro_batch_size"] * p["dp"]) == 0
        assert isinstance(p["fits"], bool) and p["fits"]  # a tiny model fits an H100
        parts = p["memory_gb"]
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
        assert p["step_time_s"] == pytest.approx(p["step_time_parts_s"]["total"]) and p["step_time_s"] > 0
        assert p["sequence_parallel"] == (p["tp"] > 1)
    times = [p["step_time_s"] for p in layouts]
    assert times == sorted(times)
    # Recompute costs time, never memory: at one layout, none is fastest and full keeps the least.
    at = {p["recompute"]: p for p in layouts if (p["tp"], p["pp"], p["micro_batch_size"]) == (1, 1, 1)}
    assert at["none"]["step_time_s"] < at["selective"]["step_time_s"] < at["full"]["step_time_s"]
    assert at["full"]["memory_gb"]["activations"] < at["selective"]["memory_gb"]["activations"] \
        <= at["none"]["memory_gb"]["activations"]


def test_table_and_the_best_layout_as_overrides(layouts):
    done = plan(*TINY, "--top", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("stage1_prebuffer of a ") and "1 x 4 GPUs of 80 GB" in lines[0]
    assert f"{len(layouts)} layouts, {len(layouts)} fit" in lines[1]
    best = layouts[0]
    assert lines[-1].strip() == " ".join(best["overrides"])
    assert f"parallel.tp={best['tp']}" in lines[-1] and f"train.recompute={best['recompute']}" in lines[-1]


def test_over_memory_layouts_are_marked_and_ranked_last(layouts):
    totals = sorted(p["memory_gb"]["total"] for p in layouts)
    limit = round(totals[len(totals) // 2], 4)  # half the layouts fit a GPU of the median's size
    done = plan(*TINY, f"cluster.gpu_memory_gb={limit}", "--json")
    assert done.returncode == 0, done.stderr
    layouts = json.loads(done.stdout)
    fits = [p["fits"] for p in layouts]
    assert True in fits and False in fits and fits == sorted(fits, reverse=True)
    for p in layouts:
        assert p["fits"] == (p["memory_gb"]["total"] <= limit)
        assert p["over_gb"] == pytest.approx(max(p["memory_gb"]["total"] - limit, 0.0))
    for group in ([p for p in layouts if p["fits"]], [p for p in layouts if not p["fits"]]):
        assert [p["step_time_s"] for p in group] == sorted(p["step_time_s"] for p in group)


def test_current_is_the_configured_layout():
    done = plan(*TINY, "parallel.tp=2", "train.recompute=full", "--current", "--json")
    assert done.returncode == 0, done.stderr
    [p] = json.loads(done.stdout)
    assert (p["tp"], p["pp"], p["dp"], p["recompute"], p["sequence_parallel"]) == (2, 1, 2, "full", False)


@pytest.mark.parametrize("args, message", [
    (["model=tiny"], "the plan needs the GPUs' facts: set cluster.gpu_memory_gb, cluster.peak_tflops"),
    ([*TINY, "--top"], "--top needs a number"),
    ([*TINY, "--frobnicate"], "unknown option --frobnicate"),
    ([*TINY, "model=nope"], "config error: "),
    ([*TINY, "train.dtype=float32"], "pretrain.plan models bf16 GPU runs"),
])
def test_errors_are_one_line(args, message):
    done = plan(*args)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert message in lines[0] and "Traceback" not in done.stderr, done.stderr
