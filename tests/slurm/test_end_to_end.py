"""Real training through a real SLURM cluster (acceptance 2-4): a tiny 2-process job, preemption
with requeue, the stage pipeline and a failing pipeline.

To keep the suite short on a 2-core machine, the module fixture starts everything at once (the
direct torchrun reference run and four SLURM submissions run side by side on the single node);
each test then waits for its own part, every wait with a timeout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm.helpers import (
    CLI_TIMEOUT_S,
    JOB_TIMEOUT_S,
    REPO,
    cli_process,
    cluster_overrides,
    job_env,
    job_log,
    losses,
    run_cli,
    submit_in_process,
    tiny_overrides,
    wait_done,
    wait_for_step,
)

pytestmark = pytest.mark.slow

STEPS = 6


class Launches:
    """Everything the tests of this module need, started together."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        # (2) a tiny 2-process run through the slurm.submit command line ...
        self.plain_dir = root / "plain"
        plain = cli_process("slurm.submit",
                            ["--cpu", *tiny_overrides(data, self.plain_dir, STEPS), *cluster_overrides()])
        # ... and the same run launched directly with torchrun: the reference for (2) and (3).
        self.direct_dir = root / "direct"
        self.direct_log = open(root / "direct.log", "w")
        self.direct = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             "-m", "pretrain.train", *tiny_overrides(data, self.direct_dir, STEPS)],
            cwd=REPO, env=job_env(), stdout=self.direct_log, stderr=subprocess.STDOUT)
        # (3) the same run again, to be preempted. It checkpoints only at the end by itself, so any
        # checkpoint before step 6 was written because of the signal.
        self.preempt_dir = root / "preempt"
        [self.preempt_job] = submit_in_process(
            ["--cpu", *tiny_overrides(data, self.preempt_dir, STEPS, every=STEPS), *cluster_overrides()])
        self.signal_sent: subprocess.CompletedProcess | None = None
        self.signal_error: BaseException | None = None
        self.preempter = threading.Thread(target=self._preempt, daemon=True)
        self.preempter.start()
        # (4) the three stages, two steps each, chained.
        self.pipe_dir = root / "pipeline"
        pipe = [o for o in tiny_overrides(data, self.pipe_dir, 2, 2) if not o.startswith("stage=")]
        self.pipe_jobs = submit_in_process(["--cpu", "--pipeline", *pipe, *cluster_overrides()])
        # (4b) a pipeline whose first stage fails (no data there): it is requeued once as a crash,
        # fails again, and stages 2 and 3 must be cancelled instead of pending forever.
        self.bad_dir = root / "bad-pipeline"
        bad = [o for o in tiny_overrides(data, self.bad_dir, 2, 2) if not o.startswith("stage=")]
        (root / "no-data").mkdir()
        self.bad_jobs = submit_in_process(["--cpu", "--pipeline", *bad,
                                           f"stage1_prebuffer.data.path={root / 'no-data'}",
                                           *cluster_overrides(max_restarts=1)])
        out, err = plain.communicate(timeout=CLI_TIMEOUT_S)
        assert plain.returncode == 0, err
        [self.plain_job] = out.split()

    def _preempt(self) -> None:
        """As soon as the job has logged step 2: the preemption warning, as SLURM would send it."""
        try:
            wait_for_step(self.preempt_dir, 2, self.preempt_job)
            self.signal_sent = subprocess.run(["scancel", "--signal=USR1", "--batch", self.preempt_job],
                                              capture_output=True, text=True, timeout=60)
        except BaseException as err:  # handed to the test
            self.signal_error = err

    def direct_losses(self) -> dict[int, float]:
        try:
            code = self.direct.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.direct.kill()
            raise
        self.direct_log.flush()
        assert code == 0, (self.root / "direct.log").read_text(errors="replace")[-6000:]
        return losses(self.direct_dir)

    def close(self) -> None:
        if self.direct.poll() is None:
            self.direct.kill()
            self.direct.wait(timeout=60)
        self.direct_log.close()


@pytest.fixture(scope="module")
def launches(slurm_cluster, synthetic_data, tmp_path_factory):
    started = Launches(tmp_path_factory.mktemp("slurm-e2e"), synthetic_data)
    try:
        yield started
    finally:
        started.close()
        ids = [started.plain_job, started.preempt_job, *started.pipe_jobs, *started.bad_jobs]
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)  # anything a failed test left


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    diffs = {step: abs(got[step] - want[step]) for step in want}
    assert got == want, f"losses differ from the reference run: {diffs}"


def test_tiny_job_through_slurm_matches_torchrun(launches):
    job = launches.plain_job
    info = wait_done(job)
    log = job_log(launches.plain_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "0"
    assert "training finished (exit code 0): not requeueing" in log
    assert (launches.plain_dir / "job.sbatch").is_file()  # the script is kept in the run dir
    assert_same_losses(losses(launches.plain_dir), launches.direct_losses())


def test_preemption_checkpoints_requeues_and_matches_uninterrupted_run(launches):
    job, run_dir = launches.preempt_job, launches.preempt_dir
    launches.preempter.join(timeout=JOB_TIMEOUT_S)
    if launches.signal_error is not None:
        raise launches.signal_error
    assert launches.signal_sent is not None and launches.signal_sent.returncode == 0, launches.signal_sent
    info = wait_done(job)
    log = job_log(run_dir, job, tail=200_000)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log  # SLURM shows the restart

    # The signal made training checkpoint mid-run (checkpoint.every=6: only the signal saves earlier).
    stopped = re.search(r"checkpoint written at step (\d+)", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 2 <= step < STEPS
    assert "got SIGUSR1" in log and "requeueing job" in log
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}" in log
    # One log, appended by both starts; one W&B run continued.
    assert len(re.findall(r"\[neo-slurm [^]]*\] job \d+ on ", log)) == 2
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) >= 2 and all(name.endswith(f"-{run_id}") for name in wandb_runs), wandb_runs

    assert_same_losses(losses(run_dir), launches.direct_losses())

    # slurm.status reports the job, its restart and the final step.
    status = run_cli("slurm.status", [str(run_dir), "--json"])
    assert status.returncode == 0, status.stderr
    [row] = [json.loads(line) for line in status.stdout.splitlines()]
    assert (row["job_id"], row["state"], row["restarts"]) == (job, "COMPLETED", "1")
    assert (row["step"], row["checkpoint_step"], row["steps"]) == (STEPS, STEPS, STEPS)
    table = run_cli("slurm.status", [str(run_dir)])
    assert table.returncode == 0 and job in table.stdout and "COMPLETED" in table.stdout


def _time(info: dict[str, str], key: str) -> datetime:
    return datetime.fromisoformat(info[key])


def test_pipeline_runs_stages_in_order_from_previous_checkpoints(launches):
    root, ids = launches.pipe_dir, launches.pipe_jobs
    stages = ["stage1_prebuffer", "stage2_midtrain", "stage3_sft"]
    infos = [wait_done(job) for job in ids]
    logs = [job_log(root / stage, job) for stage, job in zip(stages, ids, strict=True)]
    for info, log in zip(infos, logs, strict=True):
        assert info["JobState"] == "COMPLETED", log
    records = [json.loads(line) for line in (root / "slurm_jobs.jsonl").read_text().splitlines()]
    assert [r["dependency"] for r in records] == ["", f"afterok:{ids[0]}", f"afterok:{ids[1]}"]
    for k in (1, 2):  # in order: stage k+1 starts only after stage k ended
        assert _time(infos[k], "StartTime") >= _time(infos[k - 1], "EndTime")
        previous = root / stages[k - 1] / "checkpoints" / "step_00000002"
        assert f"initial weights from {previous}" in logs[k], logs[k]
    assert "initial weights from" not in logs[0]
    for stage in stages:
        assert sorted(losses(root / stage)) == [1, 2]
        assert (root / stage / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    status = run_cli("slurm.status", [str(root), "--json"])
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert [(r["stage"], r["state"], r["step"]) for r in rows] == [(s, "COMPLETED", 2) for s in stages]


def test_failing_stage_cancels_the_rest_of_the_pipeline(launches):
    root, (first, second, third) = launches.bad_dir, launches.bad_jobs
    info = wait_done(first)
    log = job_log(root / "stage1_prebuffer", first)
    assert info["JobState"] == "FAILED", log
    assert info["Restarts"] == "1", log  # a crash is requeued while under cluster.max_restarts=1 ...
    assert "training crashed" in log and "requeueing job" in log
    assert "NOT requeueing: 1 restarts used, cluster.max_restarts=1" in log  # ... and then gives up
    for job, stage in ((second, "stage2_midtrain"), (third, "stage3_sft")):
        later = wait_done(job, timeout=120)  # cancelled, not pending forever
        assert later["JobState"] == "CANCELLED" and later["Reason"] == "DependencyNeverSatisfied", later
        assert not (root / stage / f"slurm-{job}.out").exists()  # never started
    status = run_cli("slurm.status", [str(root), "--json"])
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert [(r["job_id"], r["state"], r["restarts"]) for r in rows] == [
        (first, "FAILED", "1"), (second, "CANCELLED", "0"), (third, "CANCELLED", "0")]
    assert [r["elapsed"] for r in rows[1:]] == ["-", "-"]
