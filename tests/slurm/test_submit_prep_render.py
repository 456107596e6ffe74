"""slurm.submit_prep without a cluster: the --dry-run scripts of a 64-part build read line by line,
a hostile --output that must stay one argument, one-line usage errors (exit 2) and SLURM failures
(exit 1) with fake sbatch/scancel, and what --missing plans from the part manifests."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main as data_prep_main
from slurm import submit_prep
from slurm.render import PrepSpec, render_prep_array, render_prep_merge
from tests.slurm.helpers import REPO
from tests.slurm.test_submit_render import command_of, sbatch_lines, scripts_of

HOSTILE = "out dir $(touch pwned) `touch pwned2` \"q\" 'x' ;touch pwned3 #h %j"


@pytest.fixture
def ann(tmp_path, monkeypatch) -> Path:
    """An annotation file; the test runs in tmp_path (the jobs' working directory)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "yo"}]}) + "\n")
    return path


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = submit_prep.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CLUSTER = ["--partition", "cpu", "--account", "proj", "--time", "04:00:00", "--cpus-per-task", "16",
           "--mem", "64G", "--sbatch-arg=--qos=high"]


def test_dry_run_of_a_64_part_build(tmp_path, ann, capsys):
    out = tmp_path / "built"
    build = ["--format", "neo-json", "--annotations", str(ann), "--image-root", str(tmp_path),
             "--output", str(out), "--shard-max-samples", "500"]
    code, stdout, stderr = run_main(capsys, ["--parts", "64", "--concurrency", "8", "--dry-run", *CLUSTER,
                                             "--", *build])
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.jsonl"], "--dry-run must not write anything"
    [(array_cmd, array), (merge_cmd, merge)] = scripts_of(stdout)
    assert array_cmd == f"# would run: sbatch --parsable {out}.slurm/prep_array.sbatch"
    assert merge_cmd == ("# would run: sbatch --parsable --dependency=afterok:<array job id> "
                         f"--kill-on-invalid-dep=yes {out}.slurm/prep_merge.sbatch")
    for script in (array, merge):
        assert "{{" not in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, "not valid bash"

    lines = array.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert sbatch_lines(array) == [
        "--job-name=neo-prep-built", "--array=0-63%8", "--cpus-per-task=16", "--mem=64G", "--time=04:00:00",
        "--partition=cpu", "--account=proj", f"--output={out}.slurm/prep-%A_%a.out", "--open-mode=append",
        "--qos=high",
    ]  # each task its own log (%A_%a); a requeued task appends to it
    body = [line for line in lines if line and not line.startswith("#")]
    assert body[:6] == [
        "set -euo pipefail",
        ': "${SLURM_ARRAY_TASK_ID:?not a SLURM array task: submit it with sbatch --array=0-63}"',
        f"cd {tmp_path}  # where it was submitted from: relative paths in the build flags keep their meaning",
        f"export PYTHONPATH={REPO}" + "${PYTHONPATH:+:$PYTHONPATH}",
        "export PYTHONUNBUFFERED=1",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the image work runs in --workers processes",
    ]
    argv = command_of(array, sys.executable)  # the submitter's interpreter (its venv)
    assert argv == [sys.executable, "-m", "data_prep", "build", *build,
                    "--parts", "64", "--part", "$SLURM_ARRAY_TASK_ID", "--workers", "16"]
    assert '--parts 64 --part "$SLURM_ARRAY_TASK_ID" --workers 16' in array

    assert sbatch_lines(merge) == [
        "--job-name=neo-prep-built-merge", "--cpus-per-task=1", "--mem=64G", "--time=04:00:00",
        "--partition=cpu", "--account=proj", f"--output={out}.slurm/merge-%j.out", "--open-mode=append",
        "--qos=high",
    ]
    assert command_of(merge, sys.executable) == [sys.executable, "-m", "data_prep", "merge", str(out)]
    assert "set -euo pipefail" in merge.splitlines()


def test_without_concurrency_and_a_named_script_dir(tmp_path, ann, capsys):
    code, stdout, _ = run_main(capsys, ["--parts", "3", "--dry-run", "--script-dir", "jobs", "--job-name",
                                        "mine", "--", *BUILD])
    assert code == 0
    [(array_cmd, array), (merge_cmd, merge)] = scripts_of(stdout)
    assert array_cmd.endswith(f" {tmp_path}/jobs/prep_array.sbatch")
    assert sbatch_lines(array) == ["--job-name=mine", "--array=0-2", "--cpus-per-task=8", "--time=24:00:00",
                                   f"--output={tmp_path}/jobs/prep-%A_%a.out", "--open-mode=append"]
    assert sbatch_lines(merge)[0] == "--job-name=mine-merge"
    # relative build paths stay as given (the job runs where this was submitted); the merge gets it absolute
    assert command_of(array, sys.executable)[4:10] == ["--format", "neo-json", "--annotations", "ann.jsonl",
                                                        "--output", "o"]
    assert command_of(merge, sys.executable)[-1] == f"{tmp_path}/o"


def test_hostile_output_is_one_argument_and_runs_nothing(tmp_path, ann, capsys):
    out = tmp_path / HOSTILE
    build = ["--format", "neo-json", "--annotations", str(ann), "--output", str(out)]
    code, stdout, stderr = run_main(capsys, ["--parts", "4", "--dry-run", "--", *build])
    assert code == 0, stderr
    [(array_cmd, array), (merge_cmd, merge)] = scripts_of(stdout)
    # the printed commands are shell-quoted too: pasted into a shell they submit these files
    assert shlex.split(array_cmd.removeprefix("# would run: "))[-1] == f"{out}.slurm/prep_array.sbatch"
    assert shlex.split(merge_cmd.removeprefix("# would run: "))[-1] == f"{out}.slurm/prep_merge.sbatch"
    # #SBATCH: sbatch's double quotes, '%' doubled so that %j in the path stays literal
    log = str(out).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    assert f'--output="{log}.slurm/prep-%A_%a.out"' in sbatch_lines(array)
    assert command_of(array, sys.executable)[4:10] == build
    assert command_of(merge, sys.executable)[-1] == str(out)

    # Run both scripts for real with a stand-in python that records its argv: the path arrives
    # as one argument and none of the $(...), `...`, ; in it ran.
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/bash\nprintf '%s\\0' \"$@\" >> \"$ARGV_LOG\"\n")
    fake.chmod(0o755)
    spec = PrepSpec(output=out, build_args=tuple(build), parts=4, script_dir=PrepSpec.default_script_dir(out),
                    time="10", python=str(fake), workdir=tmp_path)
    env = {**os.environ, "ARGV_LOG": str(tmp_path / "argv"), "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "9"}
    for render in (render_prep_array, render_prep_merge):
        done = subprocess.run(["bash", "-c", render(spec)], env=env, cwd=tmp_path, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
    calls = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert calls == ["-m", "data_prep", "build", *build, "--parts", "4", "--part", "2", "--workers", "8",
                     "-m", "data_prep", "merge", str(out)]
    assert not list(tmp_path.rglob("pwned*"))
    # Without SLURM_ARRAY_TASK_ID (sbatch without --array) the task stops before the build.
    env.pop("SLURM_ARRAY_TASK_ID")
    done = subprocess.run(["bash", "-c", render_prep_array(spec)], env=env, cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "not a SLURM array task" in done.stderr


BUILD = ["--format", "neo-json", "--annotations", "ann.jsonl", "--output", "o"]


@pytest.mark.parametrize("argv, message", [
    ([], "give the data_prep build flags after --"),
    (["--parts", "4"], "give the data_prep build flags after --"),
    (["--", *BUILD], "the following arguments are required: --parts"),
    (["--parts", "0", "--", *BUILD], "--parts 0: must be at least 1"),
    (["--parts", "four", "--", *BUILD], "argument --parts: invalid int value: 'four'"),
    (["--parts", "4", "--concurrency", "0", "--", *BUILD], "--concurrency 0: must be at least 1"),
    (["--parts", "4", "--", *BUILD[:4]], "build flags: the following arguments are required: --output"),
    (["--parts", "4", "--"], "no data_prep build flags after --"),
    (["--parts", "4", "--", *BUILD, "--format", "nope"], "build flags: argument --format: invalid choice"),
    (["--parts", "4", "--", *BUILD, "--annotations", "gone.jsonl"], "annotation file not found: gone.jsonl"),
    (["--parts", "4", "--", *BUILD, "--parts", "2"], "--parts is set by submit_prep for each task"),
    (["--parts", "4", "--", *BUILD, "--part=1"], "--part is set by submit_prep for each task"),
    (["--parts", "4", "--", *BUILD, "--work", "3"], "--work is set by submit_prep for each task"),
    (["--parts", "4", "--time", "1h", "--", *BUILD], "--time '1h' is not a SLURM time limit"),
    (["--parts", "4", "--partition", "a b", "--", *BUILD], "--partition 'a b' is not a SLURM partition name"),
    (["--parts", "4", "--mem", "lots", "--", *BUILD], "--mem 'lots' is not a SLURM memory size"),
    (["--parts", "4", "--job-name", "x;y", "--", *BUILD], "--job-name 'x;y'"),
    (["--parts", "4", "--sbatch-arg=--qos=a\nrm -rf /", "--", *BUILD],
     "must be one sbatch option (starting with -) on one line"),
    (["--parts", "4", "--script-dir", "a\nb", "--", *BUILD], "contains a backslash or line break"),
    (["--parts", "4", "--", *BUILD, "--output", "o\\p"], "contains a backslash or line break"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, ann, capsys, argv, message):
    # No --dry-run: the error must come before sbatch is even looked for.
    code, stdout, stderr = run_main(capsys, argv)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage error: ") and message in lines[0], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.jsonl"], "nothing may be written"


def fake_slurm(tmp_path: Path, sbatch_body: str) -> Path:
    """A bin directory with a stand-in sbatch (``sbatch_body``) and a scancel that logs its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\n" + sbatch_body)
    (bin_dir / "scancel").write_text(f"#!/bin/bash\necho \"$*\" >> {tmp_path}/scancel.calls\n")
    for tool in ("sbatch", "scancel"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def test_sbatch_missing_or_failing_is_one_line_exit_1(tmp_path, ann, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    code, stdout, stderr = run_main(capsys, ["--parts", "2", "--", *BUILD])
    assert code == 1 and stdout == ""
    assert stderr.strip().splitlines() == [stderr.strip()] and "sbatch not found" in stderr

    bin_dir = fake_slurm(tmp_path, "echo 'sbatch: error: Batch job submission failed:' >&2\n"
                                   "echo 'Invalid account or partition' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, stdout, stderr = run_main(capsys, ["--parts", "2", "--", *BUILD])
    assert code == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("slurm error: sbatch ") and line.endswith(
        "failed: sbatch: error: Batch job submission failed: Invalid account or partition")


def test_array_is_cancelled_when_the_merge_cannot_be_submitted(tmp_path, ann, capsys, monkeypatch):
    calls = tmp_path / "sbatch.calls"
    bin_dir = fake_slurm(tmp_path, f'echo "$*" >> {calls}\n'
                                   f'[[ $(wc -l < {calls}) == 1 ]] && {{ echo 41; exit 0; }}\n'
                                   "echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2; exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, stdout, stderr = run_main(capsys, ["--parts", "2", "--", *BUILD])
    assert code == 1 and "QOSMaxSubmitJobPerUserLimit" in stderr
    first, second = calls.read_text().splitlines()
    assert first == f"--parsable {tmp_path}/o.slurm/prep_array.sbatch"
    assert second == ("--parsable --dependency=afterok:41 --kill-on-invalid-dep=yes "
                      f"{tmp_path}/o.slurm/prep_merge.sbatch")
    assert (tmp_path / "scancel.calls").read_text().split() == ["41"]  # no array without its merge


def test_submission_prints_ids_and_records_both_jobs(tmp_path, ann, capsys, monkeypatch):
    calls = tmp_path / "sbatch.calls"
    bin_dir = fake_slurm(tmp_path, f'echo "$*" >> {calls}\necho "$((40 + $(wc -l < {calls})));cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, stdout, stderr = run_main(capsys, ["--parts", "3", "--concurrency", "2", "--", *BUILD])
    assert code == 0, stderr
    assert stdout.split() == ["41", "42"]
    records = [json.loads(line) for line in (tmp_path / "o.slurm/slurm_jobs.jsonl").read_text().splitlines()]
    assert [(r["job_id"], r["stage"], r["dependency"]) for r in records] == [
        ("41", "prep-build", ""), ("42", "prep-merge", "afterok:41")]
    assert records[0]["tasks"] == "0-2" and records[0]["parts"] == 3 and records[0]["build_args"] == BUILD
    assert records[0]["output"] == str(tmp_path / "o") and records[0]["run_dir"] == str(tmp_path / "o.slurm")
    for name in ("prep_array.sbatch", "prep_merge.sbatch"):
        assert os.access(tmp_path / "o.slurm" / name, os.X_OK)


def complete_part(out: Path, index: int, parts: int = 5) -> None:
    """Part ``index`` of the BUILD, built for real (data_prep decides what a complete part is)."""
    assert out.name == "o"  # BUILD's --output, relative to the test's working directory
    flags = ["--no-progress", "--no-energon", "--workers", "1", "--parts", str(parts), "--part", str(index)]
    assert data_prep_main(["build", *BUILD, *flags]) == 0


def test_missing_plans_only_the_parts_without_a_manifest(tmp_path, ann, capsys):
    out = tmp_path / "o"
    complete_part(out, 0)
    complete_part(out, 2)
    (out / "parts" / "part-00001").mkdir()  # half-written: no manifest.json
    (out / "parts" / "part-00003").mkdir()
    (out / "parts" / "part-00003" / "manifest.json").write_text("{}")  # damaged: merge would refuse it
    args = ["--parts", "5", "--concurrency", "2", "--missing", "--dry-run", "--", *BUILD]
    code, stdout, stderr = run_main(capsys, args)
    assert code == 0, stderr
    assert "# 3 of 5 parts incomplete; resubmitting parts 1,3-4" in stdout.splitlines()
    [(array_cmd, array), (merge_cmd, _)] = scripts_of(stdout)
    assert array_cmd == f"# would run: sbatch --parsable --array=1,3-4%2 {out}.slurm/prep_array.sbatch"
    assert "--dependency=afterok:<array job id> --kill-on-invalid-dep=yes" in merge_cmd
    assert "--array=0-4%2" in sbatch_lines(array)  # the script keeps every part; the command line picks

    for index in (1, 3, 4):
        complete_part(out, index)
    code, stdout, _ = run_main(capsys, args)
    assert code == 0
    [(merge_cmd, _)] = scripts_of(stdout)  # all parts there: only the merge, after nothing
    assert merge_cmd == f"# would run: sbatch --parsable {out}.slurm/prep_merge.sbatch"

    (out / "manifest.json").write_text("{}")
    code, stdout, stderr = run_main(capsys, args)
    assert code == 0 and stdout == "" and "is merged (manifest.json): nothing to submit" in stderr


def test_missing_refuses_other_build_flags_than_the_first_submission(tmp_path, ann, capsys):
    slurm_dir = tmp_path / "o.slurm"
    slurm_dir.mkdir(parents=True)
    record = {"job_id": "41", "stage": "prep-build", "parts": 5, "build_args": [*BUILD, "--quality", "90"],
              "workdir": str(tmp_path), "script": str(slurm_dir / "prep_array.sbatch")}
    (slurm_dir / "slurm_jobs.jsonl").write_text(json.dumps(record) + "\n")
    code, stdout, stderr = run_main(capsys, ["--parts", "5", "--missing", "--dry-run", "--", *BUILD])
    assert code == 2 and stdout == ""
    assert "--missing must repeat the build flags" in stderr and len(stderr.strip().splitlines()) == 1


def test_missing_while_the_first_array_still_runs(tmp_path, ann, capsys, monkeypatch):
    """Part 1 failed, part 2 is still running, part 3 pending: only part 1 is resubmitted; the new
    merge also waits for the first array (afterany) and replaces the first merge, which could never
    run. A plain resubmission meanwhile is refused: two arrays would write the same parts."""
    out, slurm_dir = tmp_path / "o", tmp_path / "o.slurm"
    complete_part(out, 0, parts=4)
    slurm_dir.mkdir()
    script, merge_script = slurm_dir / "prep_array.sbatch", slurm_dir / "prep_merge.sbatch"
    common = {"parts": 4, "output": str(out), "run_dir": str(slurm_dir)}
    records = [{"job_id": "41", "stage": "prep-build", **common, "build_args": BUILD,
                "workdir": str(tmp_path), "script": str(script), "tasks": "0-3"},
               {"job_id": "42", "stage": "prep-merge", **common, "script": str(merge_script),
                "dependency": "afterok:41"}]
    (slurm_dir / "slurm_jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task = "JobId={} ArrayJobId=41 ArrayTaskId={} JobState={} Reason={} Command=" + str(script)
    lines = {"41": [task.format(41 + t, t, state, "None")
                    for t, state in ((0, "COMPLETED"), (1, "FAILED"), (2, "RUNNING"))]
             + [task.format(41, "3%2", "PENDING", "JobArrayTaskLimit")],
             "42": [f"JobId=42 JobState=PENDING Reason=Dependency Command={merge_script}"]}
    bin_dir = fake_slurm(tmp_path, "exit 1\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\ncase $4 in\n" + "".join(
        f"{job}) printf '%s\\n' {' '.join(shlex.quote(line) for line in job_lines)} ;;\n"
        for job, job_lines in lines.items()) + "esac\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    code, stdout, stderr = run_main(capsys, ["--parts", "4", "--missing", "--dry-run", "--", *BUILD])
    assert code == 0, stderr
    [(array_cmd, _), (merge_cmd, _), (cancel_cmd, _)] = scripts_of(stdout)
    assert array_cmd == f"# would run: sbatch --parsable --array=1 {script}"
    assert merge_cmd == ("# would run: sbatch --parsable --dependency=afterok:<array job id>,afterany:41 "
                         f"--kill-on-invalid-dep=yes {merge_script}")
    assert cancel_cmd == "# would run: scancel 42  (earlier merge, superseded)"

    code, stdout, stderr = run_main(capsys, ["--parts", "4", "--", *BUILD])
    assert code == 1 and stdout == ""
    assert stderr.strip() == (f"slurm error: {out} is already being built: array job 41 (parts 2-3 pending "
                              "or running), merge job 42 (pending); wait for them, or scancel them first "
                              "(--missing resubmits only the parts that failed)")
