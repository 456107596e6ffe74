"""python -m slurm.status RUN_DIR [--json]: the SLURM jobs of a run, their states, restarts and
the training step each has reached.

RUN_DIR is a run directory or the root of a ``--pipeline`` run (then its three stages are shown).
The jobs are the ones ``slurm.submit`` recorded in ``RUN_DIR/slurm_jobs.jsonl``; their states come
from ``scontrol show job -o`` (no accounting needed; ``sacct`` is asked only about jobs slurmctld
has already forgotten). The step comes from the run's ``metrics.jsonl`` and its newest complete
checkpoint (``checkpoints/latest``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from slurm.jobs import SlurmError, job_state, read_records


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


def collect(run_dir: Path) -> list[dict]:
    rows = []
    for record in read_records(run_dir):
        info = job_state(record["job_id"])
        if info.get("Command") not in (None, record.get("script")):  # the id now names another job
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    args = parser.parse_args(argv)
    if not read_records(args.run_dir):
        print(f"no SLURM jobs recorded in {args.run_dir} (no slurm_jobs.jsonl: was it submitted with "
              "python -m slurm.submit?)", file=sys.stderr)
        return 1
    try:
        rows = collect(args.run_dir)
    except SlurmError as err:
        print(f"slurm error: {err}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"run {args.run_dir.resolve()}")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
