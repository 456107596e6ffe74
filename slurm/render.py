"""The sbatch scripts: a spec in, the text of the script out (a training job from a ``JobSpec``;
the data-prep array and merge jobs from a ``PrepSpec``), and the checks on the values that go
into ``#SBATCH`` lines, shared by every submitter.

Pure (no SLURM, no file system): ``--dry-run`` prints exactly what this returns, and the tests read
it. The templates are ``slurm/*.sbatch.in``; ``{{name}}`` fields are filled here, everything else
in them is bash. User text reaches the scripts only shell-quoted (``shlex.quote``) or, on
``#SBATCH`` lines, in sbatch's own quoting (``directive_value``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # put on the jobs' PYTHONPATH: they import this checkout
TEMPLATE = Path(__file__).with_name("job.sbatch.in")
GPU_CHECK_TEMPLATE = Path(__file__).with_name("gpu_check.sbatch.in")
PREP_ARRAY_TEMPLATE = Path(__file__).with_name("prep_array.sbatch.in")
PREP_MERGE_TEMPLATE = Path(__file__).with_name("prep_merge.sbatch.in")

# pretrain.trainer.REQUEUE_EXIT_CODE and EXIT_STATUS_FILE (tests keep them equal; importing the
# trainer here would pull in megatron-core just to read constants).
REQUEUE_EXIT_CODE = 85
EXIT_STATUS_FILE = "exit_status.json"  # rank 0's record of how training ended, in the run directory


@dataclass(frozen=True)
class JobSpec:
    stage: str
    run_dir: Path  # absolute; the script, the SLURM log and the job records live here
    train_overrides: tuple[str, ...]  # Hydra overrides for `python -m pretrain.train`
    nodes: int
    procs_per_node: int  # GPUs per node, or processes per node on a CPU cluster
    gpu: bool
    time: str
    partition: str = ""
    account: str = ""
    cpus_per_task: int = 0
    max_restarts: int = 10
    signal_lead_s: int = 300
    python: str = "python"
    repo: Path = Path(".")  # put on PYTHONPATH so `-m pretrain.train` imports this checkout
    workdir: Path = Path(".")  # the job's working directory (relative paths in the overrides)
    extra_sbatch: tuple[str, ...] = ()  # site specifics: --qos=..., --constraint=..., --exclusive
    job_name: str = ""
    final_checkpoint: Path = Path("checkpoints/step_final")  # the checkpoint of the last step


    @property
    def script_path(self) -> Path:
        return self.run_dir / "job.sbatch"

    @property
    def log_pattern(self) -> Path:
        return self.run_dir / "slurm-%j.out"



@dataclass(frozen=True)
class PrepSpec:
    """A partitioned ``python -m data_prep build``: an array job of ``parts`` tasks, task I building
    part I, and a merge job after it."""

    output: Path  # absolute --output of the build: the merged data set
    build_args: tuple[str, ...]  # the user's data_prep build flags, verbatim (--output among them)
    parts: int
    script_dir: Path  # absolute; the two scripts, their logs and the job records live here
    time: str
    concurrency: int = 0  # at most this many tasks at once (%K); 0: no limit
    partition: str = ""
    account: str = ""
    cpus_per_task: int = 8  # per array task, and the build's --workers
    mem: str = ""
    job_name: str = "neo-prep"  # the array's; the merge's gets -merge appended
    extra_sbatch: tuple[str, ...] = ()
    python: str = "python"
    repo: Path = REPO
    workdir: Path = Path(".")  # where relative paths in build_args point from

    @staticmethod
    def default_script_dir(output: Path) -> Path:
        """``OUT.slurm/`` next to the data set: data_prep refuses (and merge would not keep) files
        it did not write inside ``OUT``."""
        return output.parent / (output.name + ".slurm")

    @property
    def array_script(self) -> Path:
        return self.script_dir / "prep_array.sbatch"

    @property
    def merge_script(self) -> Path:
        return self.script_dir / "prep_merge.sbatch"

    @property
    def array_range(self) -> str:
        """The script's own --array: every part (sbatch --array=... on the command line overrides it)."""
        return f"0-{self.parts - 1}" + (f"%{self.concurrency}" if self.concurrency else "")

    def task_log(self, job_id: str, task: int | str) -> Path:
        return self.script_dir / f"prep-{job_id}_{task}.out"

    def merge_log(self, job_id: str) -> Path:
        return self.script_dir / f"merge-{job_id}.out"


def render_prep_array(spec: PrepSpec) -> str:
    """The array job: task I runs the build of part I. Its log: SCRIPT_DIR/prep-<array job>_<task>.out."""
    lines, option = [], []
    for arg in spec.build_args:  # one line per option and its values
        if arg.startswith("-") and option:
            lines.append(option)
            option = []
        option.append(shlex.quote(arg))
    lines += [option] if option else []
    return _fill(PREP_ARRAY_TEMPLATE, {
        "parts": str(spec.parts),
        "last": str(spec.parts - 1),
        "script": shlex.quote(str(spec.array_script)),
        "directives": "\n".join(directives(
            spec.job_name, allocation=[f"--array={spec.array_range}"], cpus_per_task=spec.cpus_per_task,
            mem=spec.mem, time=spec.time, partition=spec.partition, account=spec.account,
            output=log_pattern(spec.script_dir, "prep-%A_%a.out"), behaviour=["--open-mode=append"],
            extra=spec.extra_sbatch)),
        "workdir": shlex.quote(str(spec.workdir)),
        "repo": shlex.quote(str(spec.repo)),
        "python": shlex.quote(spec.python),
        "build_args": " \\\n".join("    " + " ".join(line) for line in lines),
        "workers": str(spec.cpus_per_task),
    })


def render_prep_merge(spec: PrepSpec) -> str:
    """The merge job (one CPU). Its log: SCRIPT_DIR/merge-<job>.out."""
    return _fill(PREP_MERGE_TEMPLATE, {
        "parts": str(spec.parts),
        "script": shlex.quote(str(spec.merge_script)),
        "directives": "\n".join(directives(
            f"{spec.job_name}-merge", cpus_per_task=1, mem=spec.mem, time=spec.time, partition=spec.partition,
            account=spec.account, output=log_pattern(spec.script_dir, "merge-%j.out"),
            behaviour=["--open-mode=append"], extra=spec.extra_sbatch)),
        "workdir": shlex.quote(str(spec.workdir)),
        "repo": shlex.quote(str(spec.repo)),
        "python": shlex.quote(spec.python),
        "output": shlex.quote(str(spec.output)),
    })


def _directives(spec: JobSpec, requeue: bool = True) -> list[str]:
    allocation = [f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.gpu:
        allocation.append(f"--gpus-per-node={spec.procs_per_node}")
    behaviour = ["--open-mode=append"]
    if requeue:
        behaviour += ["--requeue", f"--signal=B:USR1@{spec.signal_lead_s}"]
    return directives(spec.job_name or "neo-" + spec.stage, allocation=allocation,
                      cpus_per_task=spec.cpus_per_task, time=spec.time, partition=spec.partition,
                      account=spec.account, output=str(spec.log_pattern), behaviour=behaviour,
                      extra=spec.extra_sbatch)


def directives(job_name: str, *, time: str, output: str, allocation: Iterable[str] = (),
               cpus_per_task: int = 0, mem: str = "", partition: str = "", account: str = "",
               behaviour: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
    """The ``#SBATCH`` lines of any job, in one order: name, allocation, CPUs, memory, time limit,
    partition, account, log, behaviour (append, requeue, signals), then the site's extra lines."""
    lines = [f"--job-name={job_name}", *allocation]
    if cpus_per_task > 0:
        lines.append(f"--cpus-per-task={cpus_per_task}")
    if mem:
        lines.append(f"--mem={mem}")
    lines.append(f"--time={time}")
    if partition:
        lines.append(f"--partition={partition}")
    if account:
        lines.append(f"--account={account}")
    lines += [f"--output={directive_value(output)}", *behaviour, *extra]
    return [f"#SBATCH {line}" for line in lines]


# A #SBATCH value sbatch reads as is; anything else goes in double quotes (sbatch's own quoting).
_PLAIN_DIRECTIVE = re.compile(r"[\w@%+=:,./~-]+")
SLURM_NAME = re.compile(r"[\w.,-]+")  # partition, account names
JOB_NAME = re.compile(r"[\w.,+-]+")
MEMORY = re.compile(r"\d+[KMGT]?", re.IGNORECASE)


def directive_value(text: str) -> str:
    """``text`` as one ``#SBATCH`` value: sbatch splits at whitespace and stops at ``#`` unless
    the value is in double quotes, where a backslash escapes ``"`` and ``\\``. ValueError for what
    no #SBATCH line can carry (line breaks, NUL)."""
    if _PLAIN_DIRECTIVE.fullmatch(text):
        return text
    if any(c in text for c in "\n\r\0"):
        raise ValueError(f"{text!r} contains a line break, which an #SBATCH line cannot carry")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_pattern(directory: Path, name: str) -> str:
    """A log file path for ``--output``: ``name`` may use SLURM's %j, %A, %a; a ``%`` in the
    directory is doubled so that it stays a ``%``. ValueError for a backslash (it would turn the
    replacement symbols off) or a line break."""
    text = str(directory)
    if "\\" in text or "\n" in text or "\r" in text:
        raise ValueError(f"{text!r} contains a backslash or line break, which SLURM log paths cannot carry")
    return text.replace("%", "%%") + "/" + name


def check_sbatch_arg(arg: str) -> None:
    """An extra #SBATCH line given by the user: an option, on one line."""
    if not arg.startswith("-") or any(c in arg for c in "\n\r\0"):
        raise ValueError(f"--sbatch-arg={arg!r} must be one sbatch option (starting with -) on one line")


def check_job_fields(time: str, partition: str | None, account: str | None, label) -> int:
    """The time limit in seconds, once it and the partition and account names are valid; else
    ValueError, one line naming the value as ``label(key)`` does ("cluster.time=", "--time ")."""
    try:
        limit = time_limit_seconds(time)
    except ValueError as err:
        raise ValueError(f"{label('time')}{err}") from None
    if limit <= 0:
        raise ValueError(f"{label('time')}{time!r} must be a positive time limit")
    for key, value in (("partition", partition), ("account", account)):
        if value and not SLURM_NAME.fullmatch(value):
            raise ValueError(f"{label(key)}{value!r} is not a SLURM {key} name")
    return limit


def time_limit_seconds(text: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. ValueError if none fits."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a SLURM time limit (HH:MM:SS, D-HH:MM:SS or minutes)")
    days, a, b, c = match.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if match.group(4) is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if match.group(3) is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def _env(spec: JobSpec) -> list[str]:
    threads = max(1, spec.cpus_per_task // spec.procs_per_node) if spec.cpus_per_task > 0 else 1
    if spec.gpu:
        return [
            "# GPUs: NCCL (the trainer picks the backend). A value set in the submitting shell wins.",
            "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
            "# a failed or timed-out collective aborts the process instead of hanging the job",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
            "export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}",
            "# Megatron's tensor/sequence-parallel communication overlap needs one hardware queue",
            "export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}",
            f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}",
        ]
    return [
        f"# CPU cluster: {spec.procs_per_node} training processes per node (cluster.gpus_per_node), gloo.",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}",
    ]


def render(spec: JobSpec) -> str:
    overrides = " \\\n".join(f"        {shlex.quote(o)}" for o in spec.train_overrides)
    fields = {
        "stage": spec.stage,
        "script": shlex.quote(str(spec.script_path)),
        "run_dir": str(spec.run_dir),
        "directives": "\n".join(_directives(spec)),
        "signal_lead_s": str(spec.signal_lead_s),
        "max_restarts": str(spec.max_restarts),
        "final_checkpoint": shlex.quote(str(spec.final_checkpoint)),
        "exit_status": shlex.quote(str(spec.run_dir / EXIT_STATUS_FILE)),
        "workdir": shlex.quote(str(spec.workdir)),
        "repo": shlex.quote(str(spec.repo)),
        "env": "\n".join(_env(spec)),
        "nodes": str(spec.nodes),
        "nproc_per_node": str(spec.procs_per_node),
        "srun_extra": f" --cpus-per-task={spec.cpus_per_task}" if spec.cpus_per_task > 0 else "",
        "python": shlex.quote(spec.python),
        # torchrun's grace for the checkpoint after a signal before it SIGKILLs its processes
        "shutdown_timeout": str(max(30, spec.signal_lead_s)),
        "overrides": overrides,
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
    }

    return _fill(TEMPLATE, fields)


def render_gpu_check(spec: JobSpec) -> str:
    """The one-node job that runs ``make gpu-check``'s tests on the allocated GPUs (no requeue: a
    check that dies is a result, not something to retry)."""
    return _fill(GPU_CHECK_TEMPLATE, {
        "script": shlex.quote(str(spec.script_path)),
        "run_dir": shlex.quote(str(spec.run_dir)),
        "directives": "\n".join(_directives(spec, requeue=False)),
        "repo": shlex.quote(str(spec.repo)),
        "env": "\n".join(_env(spec)),
        "python": shlex.quote(spec.python),
    })


def _fill(template: Path, fields: dict[str, str]) -> str:
    return re.sub(r"\{\{(\w+)\}\}", lambda match: fields[match.group(1)], template.read_text())
