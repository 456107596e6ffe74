"""The jobs of a run: the records ``slurm.submit`` keeps in the run directory, and what SLURM says
about them (``scontrol show job -o``: works without accounting; ``sacct`` only as a fallback for
jobs slurmctld has already forgotten, MinJobAge after their end).

``RUN_DIR/slurm_jobs.jsonl`` holds one JSON object per submitted job::

    {"job_id": "123", "stage": "stage1_prebuffer", "run_dir": "/abs/run/stage1_prebuffer",
     "script": ".../job.sbatch", "dependency": "", "submitted_at": "2026-...", "nodes": 4,
     "procs_per_node": 8, "steps": 200000}
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

RECORDS = "slurm_jobs.jsonl"
TIMEOUT_S = 60  # every scontrol/sbatch call; a busy slurmctld answers in well under a second


class SlurmError(RuntimeError):
    """A SLURM command failed; the message says which and why (one line)."""


def append_record(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RECORDS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / RECORDS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_command(cmd: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found: is this a SLURM login node (or is SLURM_CONF/PATH set)?")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        command = " ".join(cmd)
        raise SlurmError(f"`{command}` did not answer within {timeout:.0f}s (is slurmctld up?)") from None


_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=")


def parse_show_job(line: str) -> dict[str, str]:
    """One line of ``scontrol show job -o`` as {key: value}. Values may hold spaces (Command=...)."""
    fields: dict[str, str] = {}
    matches = list(_FIELD.finditer(line))
    for match, following in zip(matches, matches[1:] + [None], strict=True):
        end = following.start() if following is not None else len(line)
        fields[match.group(1)] = line[match.end():end].strip()
    return fields


def show_job(job_id: str) -> dict[str, str] | None:
    """``scontrol show job -o JOB`` parsed; None when slurmctld does not (or no longer) know the job."""
    done = run_command(["scontrol", "show", "job", "-o", str(job_id)])
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {done.stderr.strip() or done.stdout.strip()}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return parse_show_job(lines[0]) if lines else None


def sacct_job(job_id: str) -> dict[str, str] | None:
    """State of a job slurmctld has forgotten, from accounting (None without accounting)."""
    if shutil.which("sacct") is None:
        return None
    try:
        done = run_command(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State,ExitCode,Elapsed"])
    except SlurmError:
        return None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return None
    state, exit_code, elapsed = (lines[-1].split("|") + ["", "", ""])[:3]
    return {"JobState": state.split()[0], "ExitCode": exit_code, "RunTime": elapsed, "Restarts": "?",
            "Reason": "(from sacct)"}


def job_state(job_id: str) -> dict[str, str]:
    """What SLURM knows about a job: scontrol, else sacct, else an UNKNOWN placeholder."""
    info = show_job(job_id) or sacct_job(job_id)
    if info is None:
        return {"JobState": "UNKNOWN", "Reason": "slurmctld no longer knows the job and accounting is off",
                "Restarts": "?", "ExitCode": "?", "RunTime": "?"}
    return info


def wait_for(job_id: str, states: set[str], timeout: float, poll_s: float = 1.0) -> dict[str, str]:
    """Poll ``scontrol show job`` until the job's state is one of ``states``; SlurmError on timeout."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_state(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(poll_s)
    raise SlurmError(f"job {job_id} did not reach {sorted(states)} within {timeout:.0f}s "
                     f"(state {info.get('JobState')}, reason {info.get('Reason')})")


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
