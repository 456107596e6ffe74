"""The jobs of a run: the records ``slurm.submit`` (and ``slurm.submit_prep``) keep in the run
directory, submitting and cancelling them (``sbatch --parsable``, ``scancel``), and what SLURM says
about them (``scontrol show job -o``: works without accounting; ``sacct`` only as a fallback for
jobs slurmctld has already forgotten, MinJobAge after their end), array jobs task by task.

``RUN_DIR/slurm_jobs.jsonl`` holds one JSON object per submitted job::

    {"job_id": "123", "stage": "stage1_prebuffer", "run_dir": "/abs/run/stage1_prebuffer",
     "script": ".../job.sbatch", "dependency": "", "submitted_at": "2026-...", "nodes": 4,
     "procs_per_node": 8, "steps": 200000}

Data-prep jobs (``slurm.submit_prep``) are recorded the same way with ``"stage": "prep-build"``
(the array job; ``"tasks"``: its task ids, ``"parts"``, ``"output"``, ``"build_args"``) or
``"stage": "prep-merge"``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

RECORDS = "slurm_jobs.jsonl"
PREP_BUILD, PREP_MERGE = "prep-build", "prep-merge"  # the "stage" of slurm.submit_prep's two jobs
TIMEOUT_S = 60  # every scontrol/sbatch call; a busy slurmctld answers in well under a second


class SlurmError(RuntimeError):
    """A SLURM command failed; the message says which and why (one line)."""


def append_record(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RECORDS, "a") as f:
        f.write(json.dumps(record) + "\n")


def same_job(info: dict[str, str], record: dict) -> bool:
    """False when the recorded id now names another job (a restarted cluster counts from 1 again)."""
    return info.get("Command") in (None, record.get("script"))


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


def sbatch(script: Path, dependency: str = "", extra: tuple[str, ...] | list[str] = ()) -> str:
    """``sbatch --parsable [extra] SCRIPT``, after ``dependency`` if given (a job whose dependency
    can never be satisfied is cancelled: --kill-on-invalid-dep=yes). The job id, or SlurmError with
    sbatch's own message on one line."""
    cmd = ["sbatch", "--parsable", *extra]
    if dependency:
        cmd += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    done = run_command(cmd + [str(script)])
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout or f"exit code {done.returncode}").split())
        raise SlurmError(f"sbatch {script} failed: {message}")
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script} printed no job id: {done.stdout.strip()!r}")
    return job_id


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        run_command(["scancel", *job_ids])


def expand_task_ids(text: str) -> list[int]:
    """Array task ids as SLURM writes them (``0-63%8``, ``1,5,7-9``, ``[0-9:2]``) as a list."""
    ids: list[int] = []
    for item in text.strip().strip("[]").split("%")[0].split(","):
        first, _, rest = item.partition("-")
        last, _, step = rest.partition(":")
        if not first.strip().isdigit():
            continue
        ids += range(int(first), int(last or first) + 1, int(step or 1))
    return ids


def compact_task_ids(ids) -> str:
    """Sorted ids as SLURM's --array list: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out, ids = [], sorted(set(ids))
    start = prev = None
    for i in ids + [None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if start is None:
            start = i
        prev = i
    return ",".join(out)


def array_tasks(job_id: str) -> dict[int, dict[str, str]]:
    """task id -> ``scontrol show job -o`` fields of each task of an array job (pending tasks SLURM
    still keeps as one record are expanded); from sacct when slurmctld has forgotten the job; {}
    when nobody knows it."""
    done = run_command(["scontrol", "show", "job", "-o", str(job_id)])
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise SlurmError(f"scontrol show job {job_id} failed: {done.stderr.strip() or done.stdout.strip()}")
    tasks: dict[int, dict[str, str]] = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        fields = parse_show_job(line)
        if fields.get("ArrayJobId") == str(job_id):
            for task in expand_task_ids(fields.get("ArrayTaskId", "")):
                tasks[task] = fields
    return tasks or _sacct_array(job_id)


def _sacct_array(job_id: str) -> dict[int, dict[str, str]]:
    if shutil.which("sacct") is None:
        return {}
    try:
        done = run_command(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "JobID,State,ExitCode"])
    except SlurmError:
        return {}
    tasks: dict[int, dict[str, str]] = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        job, _, rest = line.partition("|")
        state, _, exit_code = rest.partition("|")
        head, _, task = job.partition("_")
        if head == str(job_id) and task:
            for i in expand_task_ids(task):
                tasks[i] = {"JobState": state.split()[0] if state else "UNKNOWN", "ExitCode": exit_code,
                            "Reason": "(from sacct)"}
    return tasks
