"""python -m slurm.submit_prep: a data_prep build as a SLURM array job, one task per part, and a
merge job that runs when every task has succeeded.

    python -m slurm.submit_prep --parts 64 --concurrency 8 --partition cpu --account proj \
        --time 04:00:00 --cpus-per-task 16 --mem 64G -- \
        --format neo-json --annotations /data/ann.jsonl --image-root /data/images --output /data/built

Everything after ``--`` is ``python -m data_prep build``'s flags (checked by data_prep's own
parser before anything is submitted; ``--output`` is required). Task I of the array runs
``python -m data_prep build <flags> --parts N --part I --workers <cpus-per-task>`` (a progress line every 30 s in its log)
and writes part I into ``OUT/parts/part-IIIII/``; the merge job (``--dependency=afterok:<array>``)
runs ``python -m data_prep merge OUT``. A part is complete when its ``manifest.json`` exists.

The scripts go to ``OUT.slurm/`` next to OUT (or ``--script-dir``; not inside OUT, where data_prep
refuses files it did not write): ``prep_array.sbatch`` and ``prep_merge.sbatch``, each task's log
``prep-<array job>_<task>.out``, the merge's ``merge-<job>.out``, and the job records that
``python -m slurm.status OUT`` reads (task states, parts complete out of N). The job ids (array,
then merge) are printed on stdout. The jobs run the submitter's python (its venv) with this
checkout on PYTHONPATH, in the directory it was submitted from (relative paths keep their meaning).

A failed, cancelled or timed-out task: run the same command again with ``--missing``. It submits
only the parts without a part manifest (``--array=1,5``) that no task is still building, and a
new merge after them (and after any task of an earlier array still running); an earlier merge
still pending, which could never run, is cancelled. Cluster options may change between the two
(e.g. a longer ``--time``); the build flags and ``--parts`` may not.

Exit status: 0 submitted (or nothing to do), 2 a usage error (one line, nothing submitted),
1 a SLURM failure (sbatch missing or refusing: its message on one line).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.parts import complete_parts, is_merged
from slurm.jobs import (
    PREP_BUILD,
    PREP_MERGE,
    TERMINAL,
    SlurmError,
    append_record,
    array_tasks,
    cancel,
    compact_task_ids,
    job_state,
    now,
    read_records,
    same_job,
    sbatch,
)
from slurm.render import (
    JOB_NAME,
    MEMORY,
    PrepSpec,
    check_job_fields,
    check_sbatch_arg,
    render_prep_array,
    render_prep_merge,
)


class UsageError(ValueError):
    """A command line that cannot be submitted; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m slurm.submit_prep", description=__doc__.split("\n\n")[0],
                usage="%(prog)s --parts N [options] -- <python -m data_prep build flags>")
    p.add_argument("--parts", type=int, required=True, metavar="N", help="number of parts = array tasks")
    p.add_argument("--concurrency", type=int, default=None, metavar="K",
                   help="run at most K tasks at once (--array=...%%K)")
    p.add_argument("--missing", action="store_true",
                   help="submit only the parts without a part manifest, and a new merge after them")
    p.add_argument("--dry-run", action="store_true",
                   help="print the scripts and sbatch commands; submit nothing")
    p.add_argument("--script-dir", type=Path, default=None,
                   help="where the scripts, logs and job records go (default OUT.slurm, next to OUT)")
    g = p.add_argument_group("cluster (sbatch options of both jobs)")
    g.add_argument("--partition", default="")
    g.add_argument("--account", default="")
    g.add_argument("--time", default="24:00:00",
                   help="time limit per task and for the merge (default 24:00:00)")
    g.add_argument("--cpus-per-task", type=int, default=8,
                   help="CPUs per array task, and the build's --workers (default 8; the merge gets 1)")
    g.add_argument("--mem", default="", help="memory per task, e.g. 64G (default: the partition's)")
    g.add_argument("--job-name", default="", help="the array's job name (default neo-prep-<OUT name>); "
                   "the merge's gets -merge appended")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH line for both jobs, e.g. --sbatch-arg=--qos=high (repeatable)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            return argv, []
        raise UsageError("give the data_prep build flags after --, e.g. "
                         "`--parts 8 -- --format neo-json --annotations ANN --output OUT`")
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def _flag(token: str) -> str:
    return token.split("=", 1)[0]


def check_build_args(build_args: list[str]) -> argparse.Namespace:
    """The build flags through data_prep's own parser (a typo fails here, not in 64 tasks)."""
    if not build_args:
        raise UsageError("no data_prep build flags after -- (at least --format, --annotations and --output)")
    for token in build_args:  # each task gets these from here: the part it builds, its CPUs
        flag = _flag(token)
        if flag in ("--parts", "--part") or (len(flag) >= 3 and "--workers".startswith(flag)):
            raise UsageError(f"{flag} is set by submit_prep for each task: give --parts (and --cpus-per-task "
                             "for the workers) before the --")
    from data_prep.cli import parser as data_prep_parser

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            namespace = data_prep_parser().parse_args(["build", *build_args])
    except SystemExit as exit_:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else f"exit {exit_.code}"
        raise UsageError(f"data_prep build flags: {message}") from None
    for path in namespace.annotations:
        if not Path(path).is_file():
            raise UsageError(f"annotation file not found: {path}")
    return namespace


def plan(argv: list[str]) -> tuple[argparse.Namespace, PrepSpec]:
    """The command line checked and made into a PrepSpec, or UsageError; nothing is touched."""
    own, build_args = split_argv(argv)
    args = parser().parse_args(own)
    if args.parts < 1:
        raise UsageError(f"--parts {args.parts}: must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency}: must be at least 1")
    if args.cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task {args.cpus_per_task}: must be at least 1")
    try:
        check_job_fields(args.time, args.partition, args.account, lambda key: f"--{key} ")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.mem and not MEMORY.fullmatch(args.mem):
        raise UsageError(f"--mem {args.mem!r} is not a SLURM memory size (e.g. 64G, 4000M)")
    if args.job_name and not JOB_NAME.fullmatch(args.job_name):
        raise UsageError(f"--job-name {args.job_name!r}: use letters, digits and . , + - _ only")
    try:
        for arg in args.sbatch_arg:
            check_sbatch_arg(arg)
    except ValueError as err:
        raise UsageError(str(err)) from None
    namespace = check_build_args(build_args)
    output = Path(os.path.abspath(namespace.output))
    script_dir = PrepSpec.default_script_dir(output)
    if args.script_dir:
        script_dir = Path(os.path.abspath(args.script_dir))
    name = args.job_name or "neo-prep-" + (re.sub(r"[^\w.,+-]", "_", output.name) or "data")
    spec = PrepSpec(
        output=output, build_args=tuple(build_args), parts=args.parts, script_dir=script_dir, time=args.time,
        concurrency=args.concurrency or 0, partition=args.partition, account=args.account,
        cpus_per_task=args.cpus_per_task, mem=args.mem, job_name=name, extra_sbatch=tuple(args.sbatch_arg),
        python=sys.executable, workdir=Path.cwd(),
    )
    try:
        render_prep_array(spec), render_prep_merge(spec)
    except ValueError as err:  # a script directory no #SBATCH --output can name
        raise UsageError(f"{err}; name another directory for them with --script-dir") from None
    return args, spec


@dataclass
class Survey:
    """What the earlier submissions into this script directory are doing now."""

    building: dict[int, str] = field(default_factory=dict)  # part -> array job still building it
    pending_merges: list[str] = field(default_factory=list)
    running_merges: list[str] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return bool(self.building or self.pending_merges or self.running_merges)

    def describe(self) -> str:
        jobs = {}
        for part, job in self.building.items():
            jobs.setdefault(job, []).append(part)
        words = [f"array job {job} (parts {compact_task_ids(parts)} pending or running)"
                 for job, parts in sorted(jobs.items())]
        words += [f"merge job {job} (pending)" for job in self.pending_merges]
        words += [f"merge job {job} (running)" for job in self.running_merges]
        return ", ".join(words)


def survey(spec: PrepSpec, records: list[dict]) -> Survey:
    complete = set(complete_parts(spec.output, spec.parts))
    found = Survey()
    for record in records:
        if record.get("stage") == PREP_BUILD:
            for task, info in array_tasks(record["job_id"]).items():
                active = info.get("JobState", "UNKNOWN") not in TERMINAL | {"UNKNOWN"}
                if active and task not in complete and same_job(info, record):
                    found.building[task] = record["job_id"]
        elif record.get("stage") == PREP_MERGE:
            info = job_state(record["job_id"])
            if not same_job(info, record):
                continue
            if info.get("JobState") == "PENDING":
                found.pending_merges.append(record["job_id"])
            elif info.get("JobState") not in TERMINAL | {"UNKNOWN"}:
                found.running_merges.append(record["job_id"])
    return found


@dataclass
class Submission:
    """What to run: the array's tasks (None: no array), the merge's dependency, merges to cancel."""

    tasks: list[int] | None
    after: list[str] = field(default_factory=list)  # earlier arrays still building: afterany
    cancel: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_same_build(spec: PrepSpec, records: list[dict]) -> None:
    """--missing adds parts to an earlier submission's: same build flags, N and directory."""
    last = next((r for r in reversed(records) if r.get("stage") == PREP_BUILD), None)
    if last is None:
        return
    if (last.get("build_args") != list(spec.build_args) or last.get("parts") != spec.parts
            or last.get("workdir", str(spec.workdir)) != str(spec.workdir)):
        raise UsageError(f"--missing must repeat the build flags, --parts and working directory of the "
                         f"first submission (job {last['job_id']}, recorded in {spec.script_dir}): parts "
                         "built with other options cannot be merged")


def plan_missing(spec: PrepSpec, found: Survey) -> Submission | None:
    """--missing: the parts to build again; None when there is nothing to submit (printed why)."""
    if is_merged(spec.output):
        print(f"{spec.output} is merged (manifest.json): nothing to submit", file=sys.stderr)
        return None
    if found.running_merges:
        raise SlurmError(f"merge job {', '.join(found.running_merges)} is running: wait for it to end")
    complete = set(complete_parts(spec.output, spec.parts))
    missing = [part for part in range(spec.parts) if part not in complete]
    todo = [part for part in missing if part not in found.building]
    if not missing:
        if found.pending_merges:
            print(f"all {spec.parts} parts complete; merge job {', '.join(found.pending_merges)} is pending: "
                  "nothing to submit", file=sys.stderr)
            return None
        return Submission(tasks=None, notes=[f"all {spec.parts} parts complete: submitting the merge only"])
    if not todo:
        print(f"parts {compact_task_ids(missing)} are still being built ({found.describe()}): nothing to "
              "resubmit; run --missing again if they fail", file=sys.stderr)
        return None
    submission = Submission(tasks=todo, after=sorted(set(found.building.values()), key=int),
                            cancel=found.pending_merges)
    submission.notes.append(f"{len(missing)} of {spec.parts} parts incomplete; resubmitting parts "
                            f"{compact_task_ids(todo)}")
    if found.building:
        submission.notes.append(f"still being built, the new merge waits for them: {found.describe()}")
    return submission


def array_args(spec: PrepSpec, tasks: list[int]) -> list[str]:
    """sbatch's --array for a subset of the parts (the script's own directive has them all)."""
    if tasks == list(range(spec.parts)):
        return []
    return [f"--array={compact_task_ids(tasks)}" + (f"%{spec.concurrency}" if spec.concurrency else "")]


def merge_dependency(array_id: str | None, after: list[str]) -> str:
    terms = ([f"afterok:{array_id}"] if array_id else []) + [f"afterany:{job}" for job in after]
    return ",".join(terms)


def dry_run(spec: PrepSpec, submission: Submission) -> None:
    for note in submission.notes:
        print(f"# {note}")
    if submission.tasks is not None:
        command = ["sbatch", "--parsable", *array_args(spec, submission.tasks)]
        print(f"# would run: {shlex.join(command)} {shlex.quote(str(spec.array_script))}")
        print(render_prep_array(spec), end="")
    array_id = "<array job id>" if submission.tasks is not None else None
    dependency = merge_dependency(array_id, submission.after)
    flags = f" --dependency={dependency} --kill-on-invalid-dep=yes" if dependency else ""
    print(f"# would run: sbatch --parsable{flags} {shlex.quote(str(spec.merge_script))}")
    print(render_prep_merge(spec), end="")
    if submission.cancel:
        print(f"# would run: scancel {' '.join(submission.cancel)}  (earlier merge, superseded)")


def write_scripts(spec: PrepSpec) -> None:
    spec.script_dir.mkdir(parents=True, exist_ok=True)
    for path, render in ((spec.array_script, render_prep_array), (spec.merge_script, render_prep_merge)):
        path.write_text(render(spec))
        path.chmod(0o755)


def submit(spec: PrepSpec, submission: Submission) -> list[str]:
    """sbatch the array (if any) and the merge, record both, cancel superseded merges; the ids."""
    write_scripts(spec)
    ids: list[str] = []
    common = {"run_dir": str(spec.script_dir), "output": str(spec.output), "parts": spec.parts}
    try:
        array_id = None
        if submission.tasks is not None:
            array_id = sbatch(spec.array_script, extra=array_args(spec, submission.tasks))
            ids.append(array_id)
            tasks = compact_task_ids(submission.tasks)
            append_record(spec.script_dir, {
                "job_id": array_id, "stage": PREP_BUILD, **common, "script": str(spec.array_script),
                "dependency": "", "submitted_at": now(), "tasks": tasks, "build_args": list(spec.build_args),
                "workdir": str(spec.workdir), "cpus_per_task": spec.cpus_per_task})
            print(f"submitted parts {tasks} of {spec.parts} as array job {array_id}: script "
                  f"{spec.array_script}, logs {spec.task_log(array_id, '<task>')}", file=sys.stderr)
        dependency = merge_dependency(array_id, submission.after)
        merge_id = sbatch(spec.merge_script, dependency)
        ids.append(merge_id)
        append_record(spec.script_dir, {
            "job_id": merge_id, "stage": PREP_MERGE, **common, "script": str(spec.merge_script),
            "dependency": dependency, "submitted_at": now()})
        after = f" with --dependency={dependency}" if dependency else ""
        print(f"submitted the merge as job {merge_id}{after}: log {spec.merge_log(merge_id)}",
              file=sys.stderr)
    except BaseException:
        cancel(ids)  # no array without its merge
        raise
    if submission.cancel:
        cancel(submission.cancel)
        print(f"cancelled the earlier merge job {', '.join(submission.cancel)}: the new merge {merge_id} "
              "replaces it", file=sys.stderr)
    return ids


def main(argv: list[str]) -> int:
    try:
        args, spec = plan(argv)
    except UsageError as err:
        print(f"usage error: {err} (python -m slurm.submit_prep --help)", file=sys.stderr)
        return 2
    records = read_records(spec.script_dir)
    try:
        if args.missing:
            check_same_build(spec, records)
            try:
                found = survey(spec, records)
            except SlurmError as err:
                if not args.dry_run:
                    raise
                print(f"# job states unknown ({err}): assuming no task is still running", file=sys.stderr)
                found = Survey()
            submission = plan_missing(spec, found)
            if submission is None:
                return 0
        else:
            if records and not args.dry_run:
                found = survey(spec, records)
                if found.busy:
                    raise SlurmError(f"{spec.output} is already being built: {found.describe()}; wait for "
                                     "them, or scancel them first (--missing resubmits only the parts that "
                                     "failed)")
            submission = Submission(tasks=list(range(spec.parts)))
        if args.dry_run:
            dry_run(spec, submission)
            return 0
        for note in submission.notes:
            print(note, file=sys.stderr)
        ids = submit(spec, submission)
    except UsageError as err:
        print(f"usage error: {err}", file=sys.stderr)
        return 2
    except SlurmError as err:
        print(f"slurm error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write the scripts to {spec.script_dir}: {err.strerror or err}", file=sys.stderr)
        return 1
    print("\n".join(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
