"""Helpers for the SLURM tests: submit through the real CLI, wait with timeouts, read losses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm.jobs import TERMINAL, job_state, wait_for

REPO = Path(__file__).resolve().parents[2]
# Every wait is generous: other test suites may share this machine's cores.
JOB_TIMEOUT_S = 600
CLI_TIMEOUT_S = 180


def cluster_dir() -> Path:
    default = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "neo-slurm"
    return Path(os.environ.get("NEO_SLURM_DIR") or default)


def job_env() -> dict[str, str]:
    """The environment jobs inherit: one thread per process, as torchrun uses by default."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_overrides(data: Path, run_dir: Path, steps: int = 6, every: int = 2) -> list[str]:
    return ["model=tiny", "stage=stage1_prebuffer", f"data.path={data}", f"train.steps={steps}",
            "train.seq_len=128", "train.global_batch_size=2", f"checkpoint.every={every}",
            "wandb.mode=offline", f"run_dir={run_dir}"]


def cluster_overrides(max_restarts: int = 2, time_limit: str = "00:30:00") -> list[str]:
    """One node, 2 training processes (CPU), the local cluster's partition."""
    return ["cluster.nodes=1", "cluster.gpus_per_node=2", f"cluster.time={time_limit}",
            "cluster.partition=debug", "cluster.account=neo", f"cluster.max_restarts={max_restarts}",
            "cluster.signal_lead_s=60"]


def run_cli(module: str, args: list[str], timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=job_env(), capture_output=True,
                          text=True, timeout=timeout)


def cli_process(module: str, args: list[str]) -> subprocess.Popen:
    """``python -m module args`` started in the background (communicate() with a timeout)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def submit_in_process(args: list[str]) -> list[str]:
    """slurm.submit's main() in this process (config composition without a fresh interpreter each
    time); the jobs get job_env() like the command-line submissions."""
    from slurm import submit

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(job_env())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = submit.main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0, f"slurm.submit failed ({code}):\n{err.getvalue()[-3000:]}"
    ids = out.getvalue().split()
    assert ids and all(i.isdigit() for i in ids), out.getvalue()
    return ids


def wait_done(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    return wait_for(job_id, TERMINAL, timeout)


def wait_for_step(run_dir: Path, step: int, job_id: str, timeout: float = JOB_TIMEOUT_S) -> None:
    """Until metrics.jsonl shows ``step`` (fails early if the job ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(losses(run_dir), default=0) >= step:
            return
        state = job_state(job_id)["JobState"]
        assert state not in TERMINAL, (
            f"job {job_id} ended ({state}) before step {step}:\n{job_log(run_dir, job_id)}")
        time.sleep(0.2)
    raise AssertionError(
        f"job {job_id} did not reach step {step} within {timeout}s:\n{job_log(run_dir, job_id)}")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (re-run after a crash) keeps its last value."""
    path = run_dir / "metrics.jsonl"
    out: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            out[int(row["step"])] = float(row["loss"])
    return out


def job_log(run_dir: Path, job_id: str, tail: int = 6000) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    # two ranks write to one log: a multi-byte character may be cut by the other rank
    return path.read_text(errors="replace")[-tail:] if path.is_file() else f"(no log {path})"


