"""A training run's state on disk, saved and restored as one thing (the loop calls this object).

What a checkpoint holds and how it is made atomic is ``checkpointer``'s business; this object knows
the ORDER a run is restored in, which matters:
  1. ``resume_point`` picks the checkpoint (newest valid one, or the one named);
  2. ``restore_weights`` loads the weights into the model BEFORE DeepSpeed is built: ZeRO copies
     the trainable weights into its fp32 master partitions at initialisation, and any weight loaded
     later would be overwritten at the first step;
  3. ``restore_state`` then restores the optimizer and LR schedule, RNG, data position and counters.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from pretrain.checkpoint import checkpointer as ckpt
from pretrain.checkpoint.weights import load_weights, save_weights
from pretrain.config import Config, ConfigError, Layout
from pretrain.optim.zero import load_optimizer_state


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
            shutil.copytree(tokenizer_path, tmp / "tokenizer")
        protected = {ckpt.step_dir_name(self.cfg.train.steps)}
        final = ckpt.commit_save(self.root, tmp, progress.step, self.cfg.checkpoint.keep, protected)
        if self.rank == 0:
            size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            self.log(f"saved checkpoint {final} ({size / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s)")
        return final

    def resume_point(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None

        def pick() -> Path | None:
            if mode != "auto":
                path = Path(mode)
                problem = ckpt.verify(path)
                if problem:
                    raise ConfigError(f"checkpoint.resume={path} is not usable: {problem}")
                return path
            return ckpt.find_resumable(self.root, self.log)
        return self.on_rank0(pick)

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
        else:  # a fresh optimizer continues the LR schedule where the run was
            for _ in range(progress.step):
                engine.lr_scheduler.step()
        data_state = path / "data" / f"dp_{ps.get_data_parallel_rank():05d}.json"
        loader.load_state_dict(json.loads(data_state.read_text()))
        self.log(f"resumed from {path} at step {progress.step} "
                 f"(resume took {time.perf_counter() - self._restore_started:.1f}s)")
        return progress
