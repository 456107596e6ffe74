"""The sbatch script of one training job: a ``JobSpec`` in, the text of the script out.

Pure (no SLURM, no file system): ``python -m slurm.submit --dry-run`` prints exactly what this
returns, and the tests read it. The template is ``slurm/job.sbatch.in``; ``{{name}}`` fields are
filled here, everything else in it is bash.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).with_name("job.sbatch.in")
GPU_CHECK_TEMPLATE = Path(__file__).with_name("gpu_check.sbatch.in")

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


def _directives(spec: JobSpec, requeue: bool = True) -> list[str]:
    lines = [
        f"--job-name={spec.job_name or 'neo-' + spec.stage}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
    ]
    if spec.gpu:
        lines.append(f"--gpus-per-node={spec.procs_per_node}")
    if spec.cpus_per_task > 0:
        lines.append(f"--cpus-per-task={spec.cpus_per_task}")
    lines.append(f"--time={spec.time}")
    if spec.partition:
        lines.append(f"--partition={spec.partition}")
    if spec.account:
        lines.append(f"--account={spec.account}")
    lines += [f"--output={spec.log_pattern}", "--open-mode=append"]
    if requeue:
        lines += ["--requeue", f"--signal=B:USR1@{spec.signal_lead_s}"]
    lines += list(spec.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


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
