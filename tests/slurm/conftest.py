"""Fixtures for the SLURM tests: a real single-node cluster (slurm/local_cluster/start.sh) for the
session, and a tiny synthetic data set.

The cluster lives in $NEO_SLURM_DIR (default: the directory `make slurm-up` uses). An already
running cluster there is reused and left running; a cluster this session started is stopped at
the end unless another live pytest session still uses it. Where SLURM cannot be installed or
started as root the SLURM tests are skipped, with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.helpers import REPO, cluster_dir

START = REPO / "slurm" / "local_cluster" / "start.sh"
STOP = REPO / "slurm" / "local_cluster" / "stop.sh"
START_TIMEOUT_S = 420  # includes `apt-get install` on a fresh machine (about 15 s; slow mirrors happen)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running single-node cluster (also set in os.environ for the session)."""
    directory = cluster_dir()
    directory.mkdir(parents=True, exist_ok=True)
    users = directory / "pytest-users"
    users.mkdir(exist_ok=True)
    started_marker = directory / "started-by-pytest"
    conf = directory / "slurm.conf"
    pid_file = directory / "slurmctld.pid"
    was_running = conf.is_file() and pid_file.is_file() and _alive(int(pid_file.read_text().split()[0]))
    env = {**os.environ, "NEO_SLURM_DIR": str(directory)}
    try:
        done = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{START} did not finish within {START_TIMEOUT_S}s")
    if done.returncode == 3:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "start.sh exit 3"
        pytest.skip(f"SLURM is not available here: {why}")
    if done.returncode != 0:
        pytest.fail(f"starting the local SLURM cluster failed (exit {done.returncode}):\n"
                    f"{done.stderr[-4000:]}")
    if not was_running:
        started_marker.touch()
    me = users / str(os.getpid())
    me.touch()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield conf
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        me.unlink(missing_ok=True)
        others = [p for p in users.iterdir() if p.name.isdigit() and _alive(int(p.name))]
        if started_marker.exists() and not others:
            started_marker.unlink(missing_ok=True)
            subprocess.run([str(STOP)], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """64 synthetic samples (+ tokenizer) from data_prep, shared by every end-to-end test."""
    out = tmp_path_factory.mktemp("slurm-data") / "synthetic"
    cmd = [sys.executable, "-m", "data_prep", "synthetic", "--output", str(out), "--num", "64", "--seed", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
