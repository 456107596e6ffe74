"""A training run's state on disk, saved and restored as one thing (the loop calls this object).

What a checkpoint holds and how it is made atomic is ``checkpointer``'s business; this object knows
the ORDER a run is restored in, which matters:
  1. ``resume_point`` picks the checkpoint (newest valid one, or the one named);
  2. ``restore_weights`` loads the weights into the model BEFORE DeepSpeed is built: ZeRO copies
     the trainable weights into its fp32 master partitions at initialisation, and any weight loaded
     later would be overwritten at the first step;
  3. ``restore_state`` then restores the optimizer and LR schedule, RNG, data position and counters.

What a resume takes from the checkpoint and what from this run's config (``resume_point`` compares
them with the checkpoint's config.yaml, before anything is built):
  - another stage's checkpoints in the checkpoint directory, or a checkpoint.resume of another
    stage (trainer.json "stage"): refused. A stage starts in its own run_dir from the previous
    stage's weights (init.checkpoint); the ZeRO state of another trainable set does not load, and
    this run's saves would prune the other stage's checkpoints.
  - optim.lr, beta1, beta2, eps, weight_decay and clip_grad are restored with the optimizer state
    (torch's param groups, DeepSpeed's clip_grad, the scheduler's base LRs) and would silently win
    over the config; min_lr_ratio and warmup are not (the schedule function is rebuilt from the
    config), but change the LR mid-run. A change to any of them is refused with the list of keys,
    or, with checkpoint.override_schedule=true, applied from the resume step on and logged.
  - train.steps: this run's value, always (extending a run is routine); logged, and the current LR
    re-read from the schedule at its new length.
  - optim.zero_stage or stage.trainable changed with checkpoint.load_optimizer=true: refused (the
    ZeRO state holds other partitions); checkpoint.load_optimizer=false starts a fresh optimizer
    and every optim.* value is this run's.
  - init.checkpoint / init.hf_llm are not loaded by a resume: said in the log (and a path that
    does not exist is an error, in pretrain/train.py, resume or not).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from data_prep.tokenizer import save_tokenizer
from pretrain.checkpoint import checkpointer as ckpt
from pretrain.checkpoint.weights import load_weights, save_weights
from pretrain.config import Config, ConfigError, Layout
from pretrain.optim.zero import load_optimizer_state


# Optimizer and schedule keys a resume compares with the checkpoint's config.yaml.
OPTIMIZER_KEYS = ("optim.lr", "optim.min_lr_ratio", "optim.warmup", "optim.beta1", "optim.beta2", "optim.eps",
                  "optim.weight_decay", "optim.clip_grad")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _differs(ours, theirs) -> bool:
    """Exactly different as numbers (config.yaml writes floats with repr: they read back exactly)."""
    try:
        return float(ours) != float(theirs)
    except (TypeError, ValueError):
        return ours != theirs


def saved_config(path: Path) -> dict:
    """A checkpoint's config.yaml (plain YAML: safe_load), {} if missing or unreadable."""
    try:
        data = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_stage(path: Path) -> str | None:
    """The stage a checkpoint was saved by (trainer.json "stage"), None if unknown."""
    try:
        stage = json.loads((path / "trainer.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def optimizer_changes(cfg: Config, saved: dict) -> list[tuple[str, object, object]]:
    """(key, this run's value, the checkpoint's) of every OPTIMIZER_KEYS entry that differs."""
    ours = asdict(cfg)
    out = []
    for key in OPTIMIZER_KEYS:
        theirs = _get(saved, key)
        if theirs is not None and _differs(_get(ours, key), theirs):
            out.append((key, _get(ours, key), theirs))
    return out


@dataclass
class Progress:
    """The run's counters: saved in ``trainer.json`` and restored with the rest."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    wandb_run_id: str = ""


class CheckpointManager:
    def __init__(self, cfg: Config, layout: Layout, log=print):
        self.cfg, self.layout, self.log = cfg, layout, log
        self.root = Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")
        self.rank = dist.get_rank()

    def _layout(self) -> dict:
        return {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}

    def save(self, progress: Progress, model, engine, loader, tokenizer_path: Path) -> Path:
        """Collective: every rank writes its part; the directory appears complete or not at all."""
        started = time.perf_counter()
        tmp = ckpt.prepare_save(self.root, progress.step)
        save_weights(model, tmp / "model")
        ckpt.fault_point("save", progress.step)
        engine.save_checkpoint(str(tmp / "optimizer"), tag="zero", save_latest=False, exclude_frozen_parameters=True)
        (tmp / "rng").mkdir(exist_ok=True)
        ckpt.save_rng(tmp / "rng" / f"rank_{self.rank:05d}.pt")
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
            (tmp / "data").mkdir(exist_ok=True)
            state = loader.state_dict()
            (tmp / "data" / f"dp_{ps.get_data_parallel_rank():05d}.json").write_text(json.dumps(state))
        if self.rank == 0:
            trainer = {**asdict(progress), "stage": self.cfg.stage.name, "layout": self._layout()}
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
            (tmp / "config.yaml").write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=False))
            save_tokenizer(tokenizer_path, tmp / "tokenizer")  # loadable by transformers 4.57 and 5.x
        protected = {ckpt.step_dir_name(self.cfg.train.steps)}
        final = ckpt.commit_save(self.root, tmp, progress.step, self.cfg.checkpoint.keep, protected)
        if self.rank == 0:
            size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            self.log(f"saved checkpoint {final} ({size / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s)")
        return final

    def resume_point(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh start), after the checks in this module's
        docstring: a ConfigError on every rank when the resume would not be what the config says."""
        mode = self.cfg.checkpoint.resume

        def pick() -> Path | None:
            self._check_directory_stage()
            if mode == "never":
                return None
            if mode != "auto":
                path = Path(mode)
                problem = ckpt.verify(path)
                if problem:
                    raise ConfigError(f"checkpoint.resume={path} is not usable: {problem}")
            else:
                path = ckpt.find_resumable(self.root, self.log)
            if path is not None:
                self._check_resume(path)
            return path
        return self.on_rank0(pick)

    def _check_directory_stage(self) -> None:
        """Refuse a checkpoint directory holding another stage's checkpoints (rank 0)."""
        stage = self.cfg.stage.name
        for _, path in reversed(ckpt.list_checkpoints(self.root)):
            theirs = saved_stage(path)
            if theirs is not None and theirs != stage:
                raise ConfigError(
                    f"{self.root} holds checkpoints of stage {theirs} (e.g. {path.name}) and this run is stage {stage}: "
                    f"start {stage} in its own run_dir (or checkpoint.dir) with init.checkpoint={self.root} "
                    f"to take {theirs}'s weights")

    def _check_resume(self, path: Path) -> None:
        """Compare this run's config with the checkpoint's config.yaml (rank 0); see the docstring."""
        cfg = self.cfg
        stage = saved_stage(path)
        if stage is not None and stage != cfg.stage.name:
            raise ConfigError(
                f"checkpoint.resume={path} is a checkpoint of stage {stage} and this run is stage {cfg.stage.name}: "
                f"start {cfg.stage.name} from it with init.checkpoint={path} in a new run_dir")
        saved = saved_config(path)
        changes = optimizer_changes(cfg, saved)
        listing = ", ".join(f"{k}={ours} (checkpoint: {theirs})" for k, ours, theirs in changes)
        if cfg.checkpoint.load_optimizer:
            theirs_zero, theirs_trainable = _get(saved, "optim.zero_stage"), _get(saved, "stage.trainable")
            if theirs_zero is not None and theirs_zero != cfg.optim.zero_stage:
                raise ConfigError(
                    f"optim.zero_stage={cfg.optim.zero_stage} but {path} holds ZeRO stage {theirs_zero} optimizer state: "
                    "set it back, or checkpoint.load_optimizer=false to continue with a fresh optimizer")
            if theirs_trainable is not None and sorted(theirs_trainable) != sorted(cfg.stage.trainable):
                raise ConfigError(
                    f"stage.trainable={list(cfg.stage.trainable)} but {path} trained {list(theirs_trainable)}: its "
                    "optimizer state holds other parameters; set checkpoint.load_optimizer=false for a fresh optimizer")
            if changes and not cfg.checkpoint.override_schedule:
                raise ConfigError(
                    f"resuming {path} with optimizer settings other than the checkpoint's: {listing}; set "
                    "checkpoint.override_schedule=true to apply them from the resume step on (the restored optimizer "
                    "state would keep the checkpoint's), or set them back")
            if changes:
                self.log(f"checkpoint.override_schedule=true: applying {listing} from the resume step on")
        elif changes:
            self.log(f"checkpoint.load_optimizer=false: a fresh optimizer with this run's {listing}")
        steps = _get(saved, "train.steps")
        if steps is not None and steps != cfg.train.steps:
            self.log(f"train.steps={cfg.train.steps} (the checkpoint's run: {steps}): the LR schedule now spans "
                     f"{cfg.train.steps} steps")
        for key in ("checkpoint", "hf_llm"):
            value = getattr(cfg.init, key)
            if value:
                self.log(f"init.{key}={value} is not loaded: the run resumes from {path}")

    def on_rank0(self, fn):
        """``fn()`` on rank 0 only (checking a manifest reads every byte of a checkpoint: once, not
        once per rank), its result or its one-line error on every rank."""
        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except (ConfigError, ckpt.CheckpointError) as err:
                box[0] = (type(err).__name__, str(err))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        raise (ConfigError if kind == "ConfigError" else ckpt.CheckpointError)(value)

    def restore_weights(self, model, path: Path) -> None:
        """Step 2: the weights (they reshard to this layout), after checking the layout allows the rest."""
        self._restore_started = time.perf_counter()
        saved = json.loads((path / "trainer.json").read_text())["layout"]
        if self.cfg.checkpoint.load_optimizer and saved != self._layout():
            raise ConfigError(
                f"{path} was saved at TP{saved['tp']}xPP{saved['pp']}xDP{saved['dp']}, this run is {self.layout}: "
                "the weights reshard, the ZeRO optimizer state does not; set checkpoint.load_optimizer=false "
                "to continue with a fresh optimizer")
        if saved["dp"] != self.layout.dp:
            raise ConfigError(f"{path} holds data-loader state for DP={saved['dp']}, this run has DP={self.layout.dp}: "
                              "redistribute it with `energon checkpoint redist` or start the data from scratch")
        load_weights(model, path / "model")

    def restore_state(self, path: Path, engine, loader) -> Progress:
        """Step 3: optimizer, LR schedule, RNG, data position; returns the run's counters."""
        saved = json.loads((path / "trainer.json").read_text())
        progress = Progress(**{k: saved[k] for k in asdict(Progress())})
        if self.cfg.checkpoint.load_optimizer:
            load_optimizer_state(engine, str(path / "optimizer"))
            ckpt.load_rng(path / "rng" / f"rank_{self.rank:05d}.pt")
            saved = saved_config(path)
            if self.cfg.checkpoint.override_schedule and optimizer_changes(self.cfg, saved):
                self._apply_optimizer_config(engine)
            elif _get(saved, "train.steps") not in (None, self.cfg.train.steps):
                self._relay_schedule(engine)  # the restored LR of the next step was the old schedule's
        else:  # a fresh optimizer continues the LR schedule where the run was
            for _ in range(progress.step):
                engine.lr_scheduler.step()
        data_state = path / "data" / f"dp_{ps.get_data_parallel_rank():05d}.json"
        loader.load_state_dict(json.loads(data_state.read_text()))
        self.log(f"resumed from {path} at step {progress.step} "
                 f"(resume took {time.perf_counter() - self._restore_started:.1f}s)")
        return progress

    def _apply_optimizer_config(self, engine) -> None:
        """checkpoint.override_schedule=true: this run's optim.* over what the optimizer state
        restored (every rank; the same values everywhere)."""
        from pretrain.optim.zero import param_groups

        o = self.cfg.optim
        scheduler = engine.lr_scheduler
        groups = scheduler.optimizer.param_groups
        decay = [g["weight_decay"] for g in param_groups(engine.module, o.weight_decay)]
        if len(decay) != len(groups):  # cannot happen with build_engine's groups; never guess
            raise ConfigError(f"cannot apply optim.weight_decay: {len(groups)} optimizer groups, {len(decay)} expected")
        for group, wd in zip(groups, decay):
            group.update(initial_lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=wd)
        scheduler.base_lrs = [o.lr] * len(groups)
        if hasattr(engine.optimizer, "clip_grad"):  # ZeRO and BF16 optimizers restore their own copy
            engine.optimizer.clip_grad = o.clip_grad
        self._relay_schedule(engine)

    def _relay_schedule(self, engine) -> None:
        """The LR of the next step from the schedule as this run defines it (base LR x the factor
        at the restored step), instead of the value the checkpoint's schedule had computed."""
        scheduler = engine.lr_scheduler
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
        self.log(f"learning rate at step {scheduler.last_epoch + 1}: {groups[0]['lr']:.3e} (this run's schedule)")
