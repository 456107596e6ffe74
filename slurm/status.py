"""python -m slurm.status RUN_DIR [--json]: the SLURM jobs of a run, their states, restarts and
the training step each has reached; for a data-prep build, its array tasks, its merge and how many
parts are complete.

RUN_DIR is a run directory or the root of a ``--pipeline`` run (then its three stages are shown),
or the output (or script directory) of ``slurm.submit_prep``. The jobs are the ones recorded in
``RUN_DIR/slurm_jobs.jsonl`` (``OUT.slurm/`` for a data-prep output OUT); their states come from
``scontrol show job -o`` (no accounting needed; ``sacct`` is asked only about jobs slurmctld has
already forgotten). The step comes from the run's ``metrics.jsonl`` and its newest complete
checkpoint (``checkpoints/latest``); a part is complete when its part manifest exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from data_prep.parts import complete_parts, is_merged
from slurm.jobs import (
    PREP_BUILD,
    SlurmError,
    array_tasks,
    compact_task_ids,
    expand_task_ids,
    job_state,
    read_records,
    same_job,
)
from slurm.render import PrepSpec


def last_logged_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    step = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return step


def checkpoint_root(run_dir: Path) -> Path:
    config = run_dir / "config.yaml"  # written by the trainer at start
    if config.is_file():
        try:
            configured = (yaml.safe_load(config.read_text()) or {}).get("checkpoint", {}).get("dir", "")
        except yaml.YAMLError:
            configured = ""
        if configured:
            return Path(configured)
    return run_dir / "checkpoints"


def checkpoint_step(run_dir: Path) -> int | None:
    latest = checkpoint_root(run_dir) / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    try:
        return int(name.rsplit("_", 1)[-1])
    except ValueError:
        return None


def is_prep(record: dict) -> bool:
    return record.get("stage", "").startswith("prep-")  # slurm.submit_prep's array and merge jobs


def collect(run_dir: Path) -> list[dict]:
    rows = []
    for record in read_records(run_dir):
        if is_prep(record):
            continue
        info = job_state(record["job_id"])
        if not same_job(info, record):
            info = {"JobState": "UNKNOWN", "Reason": f"job id {record['job_id']} now belongs to another job "
                    "(a restarted cluster?)", "Restarts": "?", "ExitCode": "?", "RunTime": "?"}
        stage_dir = Path(record["run_dir"])
        # Its RunTime is meaningless then. A job cancelled while pending may still show a StartTime
        # (SLURM sets it to the cancel time), but it never had nodes and never restarted.
        never_started = info.get("StartTime") in ("Unknown", "None") or (
            info.get("NodeList") in ("(null)", "") and info.get("Restarts") == "0")
        rows.append({
            "job_id": record["job_id"],
            "stage": record.get("stage", ""),
            "state": info.get("JobState", "?"),
            "reason": info.get("Reason", ""),
            "restarts": info.get("Restarts", "?"),
            "exit_code": info.get("ExitCode", "?"),
            "elapsed": "-" if never_started else info.get("RunTime", "?"),
            "dependency": record.get("dependency", ""),
            "step": last_logged_step(stage_dir),
            "checkpoint_step": checkpoint_step(stage_dir),
            "steps": record.get("steps"),
            "run_dir": str(stage_dir),
            "log": str(stage_dir / f"slurm-{record['job_id']}.out"),
        })
    return rows


def table(rows: list[dict]) -> str:
    header = ("JOB", "STAGE", "STATE", "RESTARTS", "EXIT", "ELAPSED", "STEP", "CHECKPOINT", "REASON")
    lines = [header]
    for r in rows:
        step = "-" if r["step"] is None else str(r["step"])
        if r["steps"]:
            step += f"/{r['steps']}"
        lines.append((r["job_id"], r["stage"], r["state"], str(r["restarts"]), r["exit_code"], r["elapsed"],
                      step, "-" if r["checkpoint_step"] is None else str(r["checkpoint_step"]),
                      r["reason"] if r["reason"] not in ("", "None") else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out += [f"log of job {r['job_id']}: {r['log']}" for r in rows if Path(r["log"]).is_file()]
    return "\n".join(out)


def _summary(states: dict[int, str]) -> str:
    """{task: state} as ``COMPLETED 0,2-5; FAILED 1``, most tasks first."""
    by_state: dict[str, list[int]] = {}
    for task, state in sorted(states.items()):
        by_state.setdefault(state, []).append(task)
    groups = sorted(by_state.items(), key=lambda item: (-len(item[1]), item[0]))
    return "; ".join(f"{state} {compact_task_ids(tasks)}" for state, tasks in groups) or "-"


def collect_prep(run_dir: Path) -> list[dict]:
    """One row per data-prep job: the array's tasks by state, the merge's state; each row also says
    how many parts of the build are complete (part manifests) and whether it is merged."""
    rows = []
    complete: dict[tuple[Path, int], list[int]] = {}  # read once per build, not once per job
    for record in filter(is_prep, read_records(run_dir)):
        output, parts = Path(record["output"]), int(record["parts"])
        if (output, parts) not in complete:
            complete[output, parts] = complete_parts(output, parts)
        done = complete[output, parts]
        row = {"job_id": record["job_id"], "stage": record["stage"],
               "dependency": record.get("dependency", ""), "output": str(output), "parts": parts,
               "parts_complete": len(done), "parts_incomplete": sorted(set(range(parts)) - set(done)),
               "merged": is_merged(output)}
        if record["stage"] == PREP_BUILD:
            tasks = {task: info for task, info in array_tasks(record["job_id"]).items()
                     if same_job(info, record)}
            states = {task: tasks[task].get("JobState", "?") if task in tasks else "UNKNOWN"
                      for task in expand_task_ids(record.get("tasks", ""))}
            reasons = sorted({info.get("Reason", "") for info in tasks.values()
                              if info.get("JobState") == "PENDING"} - {"", "None"})
            row.update(tasks=record.get("tasks", ""), state=_summary(states), reason=",".join(reasons),
                       exit_code="-", task_states={str(t): state for t, state in sorted(states.items())},
                       log=str(Path(record["run_dir"]) / f"prep-{record['job_id']}_<task>.out"))
        else:
            info = job_state(record["job_id"])
            if not same_job(info, record):
                info = {"JobState": "UNKNOWN",
                        "Reason": f"job id {record['job_id']} now belongs to another job"}
            row.update(tasks="-", state=info.get("JobState", "?"), reason=info.get("Reason", ""),
                       exit_code=info.get("ExitCode", "?"),
                       log=str(Path(record["run_dir"]) / f"merge-{record['job_id']}.out"))
        rows.append(row)
    return rows


def prep_table(rows: list[dict]) -> str:
    last = rows[-1]
    done, parts = last["parts_complete"], last["parts"]
    incomplete = last["parts_incomplete"]
    head = f"data-prep build {last['output']}: {done} of {parts} parts complete"
    head += f" (incomplete: {compact_task_ids(incomplete)})" if incomplete else ""
    head += "; merged" if last["merged"] else "; not merged"
    header = ("JOB", "STAGE", "TASKS", "STATE", "EXIT", "REASON", "DEPENDENCY")
    lines = [header] + [(r["job_id"], r["stage"], r["tasks"], r["state"], r["exit_code"],
                         r["reason"] if r["reason"] not in ("", "None") else "-", r["dependency"] or "-")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [head] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                    for line in lines]
    out += [f"log{'s' if r['stage'] == PREP_BUILD else ''} of job {r['job_id']}: {r['log']}" for r in rows]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, or a data-prep output (its OUT.slurm/)")
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    prep_dir = PrepSpec.default_script_dir(run_dir)  # slurm.submit_prep's, for a data-prep output
    if not read_records(run_dir) and read_records(prep_dir):
        run_dir = prep_dir
    if not read_records(run_dir):
        print(f"no SLURM jobs recorded in {args.run_dir} (no slurm_jobs.jsonl: was it submitted with "
              "python -m slurm.submit or slurm.submit_prep?)", file=sys.stderr)
        return 1
    try:
        rows, prep_rows = collect(run_dir), collect_prep(run_dir)
    except SlurmError as err:
        print(f"slurm error: {err}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows + prep_rows:
            print(json.dumps(row))
        return 0
    if rows:
        print(f"run {run_dir.resolve()}")
        print(table(rows))
    if prep_rows:
        print(prep_table(prep_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
