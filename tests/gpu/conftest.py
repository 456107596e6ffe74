"""Session fixtures of the GPU check (the data set and the initial checkpoint, built once) and the
table printed at the end.

Run directories live under pytest's temporary directory (``PYTEST_ARGS=--basetemp=DIR`` moves them
off a small /tmp; checkpoints are deleted once read). What stays, in ``NEO_GPU_CHECK_OUT`` (default
``runs/gpu-check``): table.md, table.json, and the console log and metrics.jsonl of every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gpu.launch import REPO
from tests.gpu.report import TABLE
from tests.gpu.sizes import SIZES

OUT = Path(os.environ.get("NEO_GPU_CHECK_OUT", REPO / "runs" / "gpu-check"))
OUT_FILES = ("table.md", "table.json", "*.log", "*.metrics.jsonl")  # what this check writes there
SESSION_START = time.monotonic()  # set at collection: the wall-time row counts from here


@pytest.fixture(scope="session")
def out_dir() -> Path:
    """The output directory, without the files of an earlier check."""
    OUT.mkdir(parents=True, exist_ok=True)
    for pattern in OUT_FILES:
        for old in OUT.glob(pattern):
            old.unlink()
    return OUT


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """Synthetic multimodal shards with large images (``SIZES.min_pixels``) and their tokenizer."""
    from data_prep.cli import main as data_prep

    out = tmp_path_factory.mktemp("data") / "synthetic-large"
    started = time.monotonic()
    assert data_prep(["synthetic", "--output", str(out), "--num", str(SIZES.samples), "--seed", "3",
                      "--min-pixels", str(SIZES.min_pixels), "--max-pixels", str(SIZES.max_pixels),
                      "--workers", str(min(16, os.cpu_count() or 1)), "--no-progress"]) == 0
    seconds = time.monotonic() - started
    TABLE.add("data: synthetic, large images", f"{SIZES.samples} samples in {seconds:.1f}s")
    return out


def hidden_cuda_env() -> dict[str, str]:
    """Conversions run on the host (gloo and the CPU compatibility layer): they need no GPU, and
    the GPUs stay free for training."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def qwen3(data, tmp_path_factory) -> Path:
    """A random HF Qwen3 of the checked model's post-LLM shape, with the data set's tokenizer."""
    from pretrain.config import compose
    from pretrain.convert.hf import write_random_qwen3

    neo = compose(list(SIZES.model)).model
    return write_random_qwen3(neo, tmp_path_factory.mktemp("qwen3") / "qwen3", data / "tokenizer", seed=0)


@pytest.fixture(scope="session")
def init_checkpoint(qwen3, tmp_path_factory) -> Path:
    """ONE fp32 checkpoint every run starts from (init.checkpoint): the Qwen3 as the post-LLM, the
    pre-Buffer and patch embedding initialised from a seed, written by the user's converter."""
    from pretrain.config import compose

    neo = compose(list(SIZES.model)).model
    out = tmp_path_factory.mktemp("init") / "neo-init"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pretrain.convert", "from-hf", str(qwen3), str(out),
         "--pre-buffer-layers", str(neo.pre_buffer_layers),
         "--vision-hidden-size", str(neo.vision_hidden_size)],
        cwd=REPO, env=hidden_cuda_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    TABLE.add("initial checkpoint: from-hf on the host", f"{time.monotonic() - started:.1f}s")
    return out


def pytest_sessionfinish(session, exitstatus) -> None:
    """The wall-time row: the budget is for the whole check, so no single test can hold it. This
    runs before the terminal summary prints the table; over budget fails the session like a test."""
    if not TABLE.rows:
        return
    wall = time.monotonic() - SESSION_START
    tp1_only = not any(r.measurement.startswith("TP2") for r in TABLE.rows)
    if SIZES.max_wall_s is not None and tp1_only:
        within = TABLE.add("wall time of the whole check (TP1)", f"{wall:.0f}s",
                           f"<= {SIZES.max_wall_s:.0f}s", wall <= SIZES.max_wall_s)
        if not within and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        TABLE.add("wall time of the whole check", f"{wall:.0f}s")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not TABLE.rows:  # every gpu test was skipped or deselected: -rs already says why
        return
    title = f"GPU check: {SIZES.name}"
    terminalreporter.write_sep("=", title)
    for line in TABLE.render():
        terminalreporter.write_line(line)
    TABLE.write(OUT, title)
    terminalreporter.write_line(f"(also in {OUT}/table.md, next to each run's console log and metrics.jsonl)")
    failed = TABLE.failed()
    if failed:
        names = "; ".join(r.measurement for r in failed)
        terminalreporter.write_line(f"{len(failed)} row(s) not ok: {names}", red=True)
