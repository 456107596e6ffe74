"""The single-node test cluster (acceptance 1) and slurm.status on its own."""

from __future__ import annotations

import json
import os
import subprocess

from slurm.jobs import parse_show_job, wait_for
from tests.slurm.conftest import START
from tests.slurm.helpers import cluster_dir, run_cli


def test_cluster_has_an_idle_node_and_runs_a_batch_job(slurm_cluster, tmp_path):
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "UP" in ping.stdout, ping.stdout + ping.stderr
    node = parse_show_job(subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True,
                                         timeout=60).stdout.splitlines()[0])
    assert node["State"].split("+")[0] in ("IDLE", "MIXED", "ALLOCATED"), node
    out = tmp_path / "hello.out"
    cmd = ["sbatch", "--parsable", f"--output={out}", "--wrap", "echo hello from $SLURM_JOB_ID"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    info = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    assert info["JobState"] == "COMPLETED", info
    assert out.read_text().strip() == f"hello from {job}"

    # slurm.status shows a recorded job by its id, unless that id now names another job.
    record = {"job_id": job, "stage": "stage1_prebuffer", "run_dir": str(tmp_path), "script": "(null)"}
    (tmp_path / "slurm_jobs.jsonl").write_text(json.dumps(record) + "\n")
    [row] = status_rows(tmp_path)
    assert (row["job_id"], row["state"], row["restarts"]) == (job, "COMPLETED", "0")
    record["script"] = str(tmp_path / "job.sbatch")  # submitted by slurm.submit, but not this job
    (tmp_path / "slurm_jobs.jsonl").write_text(json.dumps(record) + "\n")
    [row] = status_rows(tmp_path)
    assert row["state"] == "UNKNOWN" and "belongs to another job" in row["reason"]


def status_rows(run_dir) -> list[dict]:
    done = run_cli("slurm.status", [str(run_dir), "--json"])
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_start_script_reuses_a_running_cluster(slurm_cluster):
    env = {**os.environ, "NEO_SLURM_DIR": str(cluster_dir())}
    done = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "already running" in done.stderr
    assert done.stdout.strip() == f"export SLURM_CONF={slurm_cluster}"


def test_status_of_a_directory_without_jobs_says_so(tmp_path):
    done = run_cli("slurm.status", [str(tmp_path)])
    assert done.returncode == 1
    assert f"no SLURM jobs recorded in {tmp_path}" in done.stderr
