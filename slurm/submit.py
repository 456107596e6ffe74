"""python -m slurm.submit: from Hydra overrides to running SLURM jobs.

    python -m slurm.submit model=neo_9b parallel=tp4pp2 stage=stage1_prebuffer data.path=DATA \
        run_dir=runs/neo9b-s1 cluster.nodes=4 cluster.gpus_per_node=8 cluster.time=24:00:00 \
        cluster.partition=gpu cluster.account=proj [--dry-run]

    python -m slurm.submit --pipeline model=neo_9b parallel=tp4pp2 run_dir=runs/neo9b \
        stage1_prebuffer.data.path=CAPTIONS stage2_midtrain.data.path=MIX stage3_sft.data.path=SFT \
        init.hf_llm=QWEN3_DIR cluster.nodes=4 cluster.gpus_per_node=8 ...

The overrides are the training overrides of ``python -m pretrain.train`` (``cluster.*`` included).
The config is composed and validated at world size ``cluster.nodes * cluster.gpus_per_node``
before anything is submitted: a bad config costs a one-line ``config error: ...`` and no job.
The sbatch script is written to ``RUN_DIR/job.sbatch`` (kept: ``sbatch RUN_DIR/job.sbatch`` submits
the same job again), the SLURM log goes to ``RUN_DIR/slurm-<jobid>.out`` (appended across
requeues) and the job id is printed on stdout and recorded in ``RUN_DIR/slurm_jobs.jsonl``
(``python -m slurm.status RUN_DIR`` reads it).

Options:
  --dry-run        print the sbatch script(s) and the sbatch command(s); write and submit nothing
  --pipeline       stage1_prebuffer -> stage2_midtrain -> stage3_sft as three jobs chained with
                   --dependency=afterok (and --kill-on-invalid-dep=yes: a failed stage cancels the
                   rest); stage k runs in RUN_DIR/<stage> and starts from the final checkpoint of
                   stage k-1 (init.checkpoint). Overrides prefixed with a stage name
                   (``stage3_sft.data.path=...``) apply to that stage only; init.* overrides apply
                   to stage 1 only.
  --gpu-check      instead of training: one node runs `make gpu-check`'s tests (pytest -m gpu) on
                   cluster.gpus_per_node GPUs (2+ adds the TP2 case), no requeue, 30 minutes;
                   results in RUN_DIR (default runs/gpu-check): table.md, each run's log and metrics
  --force          submit a layout the planner predicts over cluster.gpu_memory_gb (the prediction
                   is printed for every GPU job; pretrain.plan finds one that fits)
  --cpu            a CPU cluster: cluster.gpus_per_node is the number of training processes per
                   node, no GPUs are requested, training uses gloo
  --sbatch-arg ARG an extra #SBATCH line for site specifics (repeatable), e.g.
                   --sbatch-arg=--qos=high --sbatch-arg=--exclusive --sbatch-arg=--mem=0
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from slurm.jobs import SlurmError, append_record, cancel, now, sbatch
from slurm.render import (
    REPO,
    JobSpec,
    check_job_fields,
    check_sbatch_arg,
    render,
    render_gpu_check,
)

STAGES = ("stage1_prebuffer", "stage2_midtrain", "stage3_sft")


def _config_error():
    from pretrain.config import ConfigError

    return ConfigError


@dataclass
class PlannedJob:
    spec: JobSpec
    steps: int
    checkpoint_root: Path
    script: str


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_cluster(cluster) -> None:
    ConfigError = _config_error()
    if cluster.nodes < 1:
        raise ConfigError(f"cluster.nodes={cluster.nodes} must be >= 1")
    if cluster.gpus_per_node < 1:
        raise ConfigError(f"cluster.gpus_per_node={cluster.gpus_per_node} must be >= 1 "
                          "(on a CPU cluster with --cpu: training processes per node)")
    if cluster.cpus_per_task < 0:
        raise ConfigError(f"cluster.cpus_per_task={cluster.cpus_per_task} must be >= 0 (0: SLURM's default)")
    if cluster.max_restarts < 0:
        raise ConfigError(f"cluster.max_restarts={cluster.max_restarts} must be >= 0")
    try:
        limit = check_job_fields(cluster.time, cluster.partition, cluster.account, lambda key: f"cluster.{key}=")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not 0 < cluster.signal_lead_s < limit:
        raise ConfigError(f"cluster.signal_lead_s={cluster.signal_lead_s} must be > 0 and shorter than "
                          f"cluster.time={cluster.time} ({limit}s): "
                          "the warning signal comes that long before the limit")


def plan_job(overrides: list[str], args: argparse.Namespace, run_dir: Path | None = None) -> PlannedJob:
    """Compose + validate one job's config and build its script. ConfigError before anything else."""
    from pretrain.checkpoint.checkpointer import step_dir_name
    from pretrain.config import compose, validate

    ConfigError = _config_error()
    if run_dir is not None:
        overrides = [o for o in overrides if override_key(o) != "run_dir"] + [f"run_dir={run_dir}"]
    cfg = compose(overrides)
    cluster = cfg.cluster
    check_cluster(cluster)
    world = cluster.nodes * cluster.gpus_per_node
    validate(cfg, world)
    if not args.cpu:
        check_memory(cfg, overrides, force=args.force)
    abs_run_dir = Path(os.path.abspath(cfg.run_dir))
    if re.search(r"\s", str(abs_run_dir)):
        raise ConfigError(f"run_dir={abs_run_dir} contains whitespace, which #SBATCH lines cannot carry")
    train_overrides = (*(o for o in overrides if override_key(o) != "run_dir"), f"run_dir={abs_run_dir}")
    name = abs_run_dir.parent.name if abs_run_dir.name == cfg.stage.name else abs_run_dir.name
    ckpt_root = abs_run_dir / "checkpoints"
    if cfg.checkpoint.dir:
        ckpt_root = Path(os.path.abspath(cfg.checkpoint.dir))
    spec = JobSpec(
        stage=cfg.stage.name, run_dir=abs_run_dir, train_overrides=train_overrides,
        nodes=cluster.nodes, procs_per_node=cluster.gpus_per_node, gpu=not args.cpu,
        time=cluster.time, partition=cluster.partition, account=cluster.account,
        cpus_per_task=cluster.cpus_per_task, max_restarts=cluster.max_restarts,
        signal_lead_s=cluster.signal_lead_s, python=sys.executable, repo=REPO, workdir=Path.cwd(),
        extra_sbatch=tuple(args.sbatch_arg), job_name=f"neo-{name}-{cfg.stage.name}",
        final_checkpoint=ckpt_root / step_dir_name(cfg.train.steps),
    )
    return PlannedJob(spec=spec, steps=cfg.train.steps, checkpoint_root=ckpt_root, script=render(spec))


def check_memory(cfg, overrides: list[str], force: bool) -> None:
    """The planner's per-GPU memory prediction for this layout (``python -m pretrain.plan``), printed
    on stderr; a layout predicted over ``cluster.gpu_memory_gb`` is refused unless ``force``.
    Unknown GPU memory (cluster=generic) is said, not checked."""
    from pretrain.plan import describe, predict_current

    if cfg.cluster.gpu_memory_gb <= 0:
        print(f"{cfg.stage.name}: memory not checked: cluster.gpu_memory_gb is unknown "
              "(pick cluster=h100_80gb, cluster=h200_141gb or set it)", file=sys.stderr)
        return
    prediction = predict_current(overrides)
    print(f"{cfg.stage.name}: memory plan: {describe(prediction)}", file=sys.stderr)
    if not prediction["fits"] and not force:
        raise _config_error()(
            f"{cfg.stage.name}: predicted {prediction['memory_gb']['total']:.1f} GB per GPU, over "
            f"cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g} by {prediction['over_gb']:.1f} GB; "
            "find a layout that fits with `python -m pretrain.plan <the same overrides>`, or submit anyway with --force")


def plan_gpu_check(overrides: list[str], args: argparse.Namespace) -> PlannedJob:
    """The GPU-check job: only ``run_dir`` and ``cluster.*`` of the overrides matter."""
    from pretrain.config import compose

    ConfigError = _config_error()
    if args.pipeline or args.cpu:
        raise ConfigError("--gpu-check runs on one GPU node: drop --pipeline and --cpu")
    if not any(override_key(o) == "run_dir" for o in overrides):
        overrides = [*overrides, "run_dir=runs/gpu-check"]
    cfg = compose(overrides)
    check_cluster(cfg.cluster)
    run_dir = Path(os.path.abspath(cfg.run_dir))
    spec = JobSpec(
        stage="gpu-check", run_dir=run_dir, train_overrides=(), nodes=1, procs_per_node=cfg.cluster.gpus_per_node,
        gpu=True, time="00:30:00", partition=cfg.cluster.partition, account=cfg.cluster.account,
        cpus_per_task=cfg.cluster.cpus_per_task, max_restarts=0, python=sys.executable, repo=REPO,
        workdir=REPO, extra_sbatch=tuple(args.sbatch_arg), job_name="neo-gpu-check",
    )
    return PlannedJob(spec=spec, steps=0, checkpoint_root=run_dir, script=render_gpu_check(spec))


def split_stage_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    common, per_stage = [], {name: [] for name in STAGES}
    for override in overrides:
        key = override_key(override)
        head, _, rest = key.partition(".")
        if head in STAGES and rest:
            prefix = override[: len(override) - len(override.lstrip("+~"))]
            per_stage[head].append(prefix + override.lstrip("+~")[len(head) + 1:])
        else:
            common.append(override)
    return common, per_stage


def plan(args: argparse.Namespace) -> list[PlannedJob]:
    ConfigError = _config_error()
    for arg in args.sbatch_arg:
        try:
            check_sbatch_arg(arg)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if args.gpu_check:
        return [plan_gpu_check(args.overrides, args)]
    common, per_stage = split_stage_overrides(args.overrides)
    if not args.pipeline:
        if any(per_stage.values()):
            raise ConfigError("overrides prefixed with a stage name (e.g. stage2_midtrain.train.steps=...) "
                              "are for --pipeline; without it write them unprefixed")
        return [plan_job(common, args)]

    if any(override_key(o) == "stage" for o in common):
        raise ConfigError("--pipeline runs all three stages: drop stage=... "
                          "(prefix an override with a stage name to set it for that stage only)")
    from pretrain.config import Config

    given = [o.split("=", 1)[1] for o in common if override_key(o) == "run_dir" and "=" in o]
    root = Path(os.path.abspath(given[-1] if given else Config().run_dir))
    init = [o for o in common if override_key(o).startswith("init.")]
    rest = [o for o in common if not override_key(o).startswith("init.") and override_key(o) != "run_dir"]
    jobs: list[PlannedJob] = []
    for k, stage in enumerate(STAGES):
        overrides = [f"stage={stage}"] + rest
        if k == 0:
            overrides += init
        else:
            overrides.append(f"init.checkpoint={jobs[-1].checkpoint_root}")
        overrides += per_stage[stage]
        job = plan_job(overrides, args, run_dir=root / stage)
        if any(job.checkpoint_root == other.checkpoint_root for other in jobs):
            raise ConfigError(f"{stage} would write its checkpoints into {job.checkpoint_root} like an "
                              "earlier stage: leave checkpoint.dir unset with --pipeline "
                              "(each stage uses <run_dir>/<stage>/checkpoints)")
        jobs.append(job)
    return jobs


def submit(jobs: list[PlannedJob], pipeline_root: Path | None) -> list[str]:
    """sbatch every job (each after the previous one when chained), record them, return the ids."""
    ids: list[str] = []
    try:
        for job in jobs:
            spec = job.spec
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            spec.script_path.write_text(job.script)
            spec.script_path.chmod(0o755)
            dependency = f"afterok:{ids[-1]}" if ids else ""
            job_id = sbatch(spec.script_path, dependency)
            ids.append(job_id)
            record = {"job_id": job_id, "stage": spec.stage, "run_dir": str(spec.run_dir),
                      "script": str(spec.script_path), "dependency": dependency, "submitted_at": now(),
                      "nodes": spec.nodes, "procs_per_node": spec.procs_per_node, "gpu": spec.gpu,
                      "steps": job.steps, "max_restarts": spec.max_restarts}
            append_record(spec.run_dir, record)
            if pipeline_root is not None:
                append_record(pipeline_root, record)
            print(f"submitted {spec.stage} as job {job_id}{' after ' + ids[-2] if dependency else ''}: "
                  f"script {spec.script_path}, log {spec.run_dir}/slurm-{job_id}.out", file=sys.stderr)
    except BaseException:
        cancel(ids)  # no half-submitted pipeline is left behind
        raise
    return ids


def dry_run(jobs: list[PlannedJob]) -> None:
    for k, job in enumerate(jobs):
        dependency = ""
        if k:
            previous = jobs[k - 1].spec.stage
            dependency = f" --dependency=afterok:<job id of {previous}> --kill-on-invalid-dep=yes"
        print(f"# would run: sbatch --parsable{dependency} {job.spec.script_path}")
        print(job.script, end="" if job.script.endswith("\n") else "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    parser.add_argument("--pipeline", action="store_true", help="chain stage 1 -> 2 -> 3 with afterok")
    parser.add_argument("--gpu-check", action="store_true",
                        help="run the GPU check (make gpu-check's tests) on one GPU node instead of training")
    parser.add_argument("--force", action="store_true",
                        help="submit even if the planner predicts the layout does not fit the GPU memory")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU cluster: cluster.gpus_per_node = training processes per node, gloo")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m pretrain.train")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = parse_args(argv)
    ConfigError = _config_error()
    try:
        jobs = plan(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:  # unknown group option, bad override syntax
        message = " ".join(str(err).split()).split(" Config search path")[0]
        print(f"config error: {type(err).__name__}: {message}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(jobs)
        return 0
    root = jobs[0].spec.run_dir.parent if args.pipeline else None
    try:
        ids = submit(jobs, root)
    except SlurmError as err:
        print(f"slurm error: {err}", file=sys.stderr)
        return 1
    print("\n".join(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
