"""The training loop: one loop for all three NEO stages, at any TP/PP/DP layout.

Per step: this DP rank's micro-batches -> megatron's pipeline schedule (forward + backward,
NEO's loss normalised over the global batch) -> gradients made whole across TP and the tied
embedding -> DeepSpeed ZeRO-1 (reduce over DP, clip by the global norm, AdamW, LR schedule) ->
metrics -> checkpoint. SIGTERM/SIGUSR1 make every rank finish the step, save and exit with
``REQUEUE_EXIT_CODE`` so a scheduler can requeue the job; the next start resumes exactly. The
data-loader workers ignore those signals (``pretrain.data.workers``): torchrun forwards a signal to
each rank's whole process group, workers included, and a worker killed by it used to kill the run.

Nothing bad is saved (``LossWatch`` and ``Trainer._checkpoint``):
  - a step whose loss or gradients are not finite, or whose loss is above ``train.loss_ceiling_factor`` x
    ln(vocab size) (three times worse than guessing: blown-up weights), is skipped;
    ``train.max_skipped_steps`` of them in a row stop the run;
  - a loss is a *spike* when ``train.spike_window`` good losses have been seen and it is above
    ``train.spike_factor`` x the median of the last ``train.spike_window`` (defaults 3 x ln(V),
    20 and 3);
  - before the checkpoint of step N is written, the loss of step N's weights on the next step's
    micro-batches is computed (forward only; those batches then train step N+1, so no data is
    skipped and a resumed run is bit-identical): the checkpoint is written only if that loss is
    good (no skip, no spike), and never at a skipped step. A due checkpoint that is not written is owed
    to the next step that passes;
  - at the first skipped step or spike after a good stretch, the newest checkpoint written before
    it is pinned in ``checkpoints/last_good.json``, which rotation never deletes; a stop names it
    and how to restart from it.
Rank 0 writes the run's outcome to ``run_dir/exit_status.json`` (``EXIT_STATUS_FILE``): torchrun
exits 1 after forwarding any signal, whatever its ranks did, so this file is how a launcher (the
SLURM job script) learns that the ranks wrote their checkpoint and exited 85.

Devices: the model lives on ``runtime.device()``. Data crosses from host to device in one place,
``_to_device`` (the loader hands pinned batches; the copies are asynchronous). Every tensor that
enters a collective is created on the device (NCCL takes nothing else), and a step syncs the host
a fixed handful of times (loss, finite check, counts, stop flag), never per parameter.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from pretrain.checkpoint import checkpointer as ckpt
from pretrain.checkpoint.manager import CheckpointManager, Progress
from pretrain.checkpoint.weights import load_weights
from pretrain.config import Config, ConfigError, Layout, TrainConfig
from pretrain.distributed import runtime
from pretrain.flops import step_flops
from pretrain.metrics import Metrics
from pretrain.model.neo import NeoModel, transformer_config
from pretrain.model.roles import set_trainable
from pretrain.model.batch import NeoBatch
from pretrain.optim.zero import build_engine, main_grads
from pretrain.schedule import finalize_grads, forward_backward

REQUEUE_EXIT_CODE = 85  # "checkpoint written after a signal: requeue me" (slurm/ relies on it)
# rank 0's record of how the run ended, in run_dir (slurm/job.sbatch.in reads it; slurm/render.py
# holds the same name)
EXIT_STATUS_FILE = "exit_status.json"

NON_FINITE = "non-finite loss or gradients"


class NonFiniteError(RuntimeError):
    """The run stops without writing a checkpoint of weights that are not good. ``outcome`` goes
    to exit_status.json: "diverged" (do not requeue: a restart would diverge the same way) or
    "unsaved" (a signal came when the weights could not be saved)."""

    def __init__(self, message: str, outcome: str = "diverged"):
        super().__init__(message)
        self.outcome = outcome


class LossWatch:
    """What a loss says about the weights it came from, robust at the start of training.

    - ``above_ceiling``: the loss is above ``ceiling_factor`` x ln(vocab size). A model that
      guesses uniformly has loss ln(vocab size); three times worse is never a state to train from
      or to save (blown-up weights). Holds from the very first step, also right after a resume.
    - ``spike``: ``window`` good losses have been seen and the loss is above ``factor`` x the
      median of the last ``window`` of them. The median ignores a few outliers, and a falling loss
      (the start of training) never fires it. Every good loss enters the window, spikes included,
      so a lasting level shift (another data mix) is accepted after about window/2 steps instead
      of blocking checkpoints for ever.
    Non-finite losses are neither (the skip rule handles them) and, like losses above the ceiling,
    never enter the window. The window starts empty in every process: after a resume the median
    rule needs ``window`` steps again, the ceiling holds at once.
    """

    def __init__(self, vocab_size: int, window: int = TrainConfig.spike_window,
                 factor: float = TrainConfig.spike_factor, ceiling_factor: float = TrainConfig.loss_ceiling_factor):
        self.window, self.factor, self.ceiling_factor = window, factor, ceiling_factor
        self.ceiling = ceiling_factor * math.log(max(vocab_size, 2))
        self.recent: deque[float] = deque(maxlen=window)

    def median(self) -> float | None:
        return statistics.median(self.recent) if len(self.recent) >= self.window else None

    def above_ceiling(self, loss: float) -> str | None:
        """Why ``loss`` is above the ceiling, or None."""
        if math.isfinite(loss) and loss > self.ceiling:
            return f"above {self.ceiling_factor:g} x ln(vocab size) = {self.ceiling:.3g}, worse than guessing"
        return None

    def spike(self, loss: float) -> str | None:
        """Why ``loss`` is a spike, or None."""
        median = self.median()
        if math.isfinite(loss) and median is not None and median > 0 and loss > self.factor * median:
            return f"above {self.factor:g} x {median:.4g}, the median of the last {self.window} losses"
        return None

    def add(self, loss: float) -> None:
        """Record the loss of a step that was not skipped."""
        if math.isfinite(loss) and loss <= self.ceiling:
            self.recent.append(loss)


class _LoaderStateAt:
    """The data loader as it was before a probe drew the next step's batches: all that
    ``CheckpointManager.save`` asks of a loader is ``state_dict()``."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, memory_plan: dict | None = None):
        self.cfg, self.layout = cfg, layout
        self.memory_plan = memory_plan  # pretrain.plan's prediction for this layout (rank 0, bf16 runs)
        self.run_dir = Path(cfg.run_dir)
        self.rank = dist.get_rank()
        self.device = runtime.device()
        self.checkpoints = CheckpointManager(cfg, layout, self.log)
        self.progress = Progress()
        self.stop_signal: int | None = None
        self.skipped_in_a_row = 0
        self.all_non_finite = True  # every step of the current skipped streak was non-finite
        self.losses = LossWatch(cfg.model.vocab_size, cfg.train.spike_window, cfg.train.spike_factor,
                                cfg.train.loss_ceiling_factor)
        self.last_good: Path | None = None  # the newest checkpoint known good (resumed from or written)
        self.trouble_since: int | None = None  # first skipped step or spike since last_good was written
        self.save_owed = False  # a due checkpoint was not written: the next step that passes writes it

    # ------------------------------------------------------------------------------- set-up

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def dtype(self) -> torch.dtype:
        name = self.cfg.train.dtype
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, name)

    def build_model(self, init_weights: bool) -> NeoModel:
        """This rank's part of the model, on the device. ``init_weights=False`` when every weight
        is about to be loaded: random initialisation would be thrown away (minutes at 9B)."""
        cfg = self.cfg
        started = time.perf_counter()
        tcfg = transformer_config(cfg.model, tp=self.layout.tp, pp=self.layout.pp,
                                  sequence_parallel=cfg.parallel.sequence_parallel,
                                  pipeline_split=self.layout.layers_per_stage, dtype=self.dtype(),
                                  init_weights=init_weights)
        model = NeoModel(tcfg, cfg.model, recompute=cfg.train.recompute).to(self.device)
        counts = set_trainable(model, cfg.stage.trainable)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"model: {cfg.model.num_parameters() / 1e6:.1f}M parameters; this rank holds "
                 f"{sum(counts.values()) / 1e6:.2f}M, {trainable / 1e6:.2f}M trainable "
                 f"({', '.join(cfg.stage.trainable)}); built on {self.device} in {time.perf_counter() - started:.1f}s"
                 f"{'' if init_weights else ' (no random init: weights are loaded next)'}")
        return model

    def initial_weights(self) -> Path | None:
        """Where a fresh run takes its weights: the previous stage, or a converted Qwen3."""
        cfg = self.cfg
        if cfg.init.checkpoint:
            try:
                path = self.checkpoints.on_rank0(lambda: ckpt.resolve(cfg.init.checkpoint, self.log))
            except ckpt.CheckpointError as err:
                raise ConfigError(f"init.checkpoint: {err}") from None
            self._check_shape(path)
            return path / "model"
        if cfg.init.hf_llm:
            out = self.run_dir / "init_from_hf"
            failure = ""
            if self.rank == 0 and not (out / "config.yaml").is_file():
                self.log(f"converting {cfg.init.hf_llm} (Qwen3) into the post-LLM of a NEO model at {out}")
                cmd = [sys.executable, "-m", "pretrain.convert", "from-hf", cfg.init.hf_llm, str(out),
                       "--pre-buffer-layers", str(cfg.model.pre_buffer_layers),
                       "--vision-hidden-size", str(cfg.model.vision_hidden_size), "--seed", str(cfg.train.seed)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    failure = f"converting init.hf_llm={cfg.init.hf_llm} failed:\n{done.stderr[-3000:]}"
            ok = torch.tensor([0.0 if failure else 1.0], device=self.device)
            dist.broadcast(ok, src=0)  # every rank learns the outcome: nobody waits for a dead peer
            if not ok.item():
                raise ConfigError(failure or "converting init.hf_llm failed on rank 0 (see its log)")
            try:
                # A conversion left by an earlier run is checked like any checkpoint.
                self.checkpoints.on_rank0(lambda: ckpt.resolve(out, self.log))
            except ckpt.CheckpointError as err:
                raise ConfigError(f"init.hf_llm: {err}; delete {out} to convert {cfg.init.hf_llm} again") from None
            self._check_shape(out)
            return out / "model"
        self.log("warning: neither init.hf_llm nor init.checkpoint is set: the model starts from random weights")
        return None

    def _check_shape(self, path: Path) -> None:
        theirs = yaml.safe_load((path / "config.yaml").read_text())["model"]
        ours = asdict(self.cfg.model)
        diff = {k: (ours[k], v) for k, v in theirs.items() if k in ours and ours[k] != v and k != "init_std"}
        if diff:
            listing = ", ".join(f"model.{k}={a} but the checkpoint has {b}" for k, (a, b) in diff.items())
            raise ConfigError(f"{path} does not fit this model: {listing}")

    def build_loader(self, tokenizer_path: Path):
        from pretrain.data.loader import TrainLoader

        cfg = self.cfg
        return TrainLoader(
            path=cfg.data.path, tokenizer_path=str(tokenizer_path), seq_len=cfg.train.seq_len,
            micro_batch_size=cfg.train.micro_batch_size, dp_rank=ps.get_data_parallel_rank(),
            dp_size=self.layout.dp, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
            packing_buffer=cfg.data.packing_buffer, shuffle_buffer=cfg.data.shuffle_buffer,
            trust_dataset_code=cfg.data.trust_dataset_code,
        )

    # ------------------------------------------------------------------------------------ loop

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def _judge(self, loss: float, grads: list[torch.Tensor]) -> tuple[str | None, str | None]:
        """(why the step must be skipped: a non-finite loss or gradient on any rank, or a loss above
        the ceiling; why its loss is a spike), None where not; the same on every rank. One fused
        reduction (the largest magnitude per tensor is inf or nan iff the tensor holds one; no
        overflow), one all-reduce, one host sync."""
        ceiling, spike = self.losses.above_ceiling(loss), self.losses.spike(loss)
        flags = torch.tensor([0.0 if math.isfinite(loss) else 1.0, float(ceiling is not None), float(spike is not None)],
                             device=self.device)
        if grads:
            largest = torch.stack(torch._foreach_norm(grads, float("inf"))).amax()
            flags[0] += (~torch.isfinite(largest)).float()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        non_finite, above, spiked = flags.tolist()
        skip = None
        if non_finite:
            skip = NON_FINITE
        elif above:
            skip = f"loss {loss:.4g} {ceiling or 'above the ceiling (on another rank)'}"
        return skip, (spike or "a spike on another rank") if spiked and skip is None else None

    def _broadcast_loss(self, loss: float | None) -> float:
        """The global loss lives on last-stage ranks; every rank gets it (for logging on rank 0)."""
        value = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64, device=self.device)
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(value, src=last, group=ps.get_pipeline_model_parallel_group())
        return value.item()

    def run(self) -> int:
        cfg, layout = self.cfg, self.layout
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.run_dir / EXIT_STATUS_FILE).unlink(missing_ok=True)  # a crash leaves none
        from pretrain.data.template import check_tokenizer

        tokenizer_path, what = cfg.tokenizer_dir()
        n_tokens = len(check_tokenizer(tokenizer_path, what))
        if n_tokens > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer at {tokenizer_path} has {n_tokens} tokens, more than "
                              f"model.vocab_size={cfg.model.vocab_size}: the embedding has no row for the rest")
        # Signals are caught from here on: one arriving during start-up stops the run at the
        # first step boundary (with a checkpoint) instead of killing it.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        # Weights first, optimizer second (pretrain/checkpoint/manager.py says why).
        resume = self.checkpoints.resume_point()
        if self.rank == 0:  # only once the resume checks accept it: config.yaml says what runs
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        self.last_good = resume
        weights = self.initial_weights() if resume is None else None
        self.model = self.build_model(init_weights=resume is None and weights is None)
        if resume is not None:
            self.checkpoints.restore_weights(self.model, resume)
        elif weights is not None:
            load_weights(self.model, weights)
            self.log(f"initial weights from {weights.parent}")
        engine, scheduler = build_engine(self.model, cfg.optim, cfg.train.steps, cfg.train.micro_batch_size,
                                         layout.num_microbatches, bf16=self.dtype() == torch.bfloat16)
        loader = self.build_loader(tokenizer_path)
        progress = self.progress
        if resume is not None:
            progress = self.progress = self.checkpoints.restore_state(resume, engine, loader)
        if not progress.wandb_run_id:
            progress.wandb_run_id = self._shared_run_id()
        metrics = Metrics(cfg, self.run_dir, self.rank == 0, progress.wandb_run_id, dist.get_world_size())
        self.log(f"training {cfg.stage.name} at {layout} from step {progress.step} to {cfg.train.steps}: "
                 f"{layout.num_microbatches} micro-batches of {cfg.train.micro_batch_size} x {cfg.train.seq_len} tokens per DP rank")
        if self.memory_plan is not None:
            from pretrain.plan import describe

            planned = self.memory_plan["allocated_gb_per_stage"][0]
            self.log(f"memory plan (pretrain.plan, train.recompute={cfg.train.recompute}): {describe(self.memory_plan)}; "
                     f"this rank (stage 1) should peak at {planned:.2f} GB allocated: the log's 'mem' column")
            metrics.planned_memory_gb = planned
        try:
            exit_code = self._loop(engine, scheduler, loader, iter(loader), metrics, tokenizer_path)
        except NonFiniteError as err:
            self._write_exit_status(1, err.outcome, str(err))
            raise
        finally:
            metrics.close()
        skipped = self._skipped_samples(loader)
        if skipped:
            where = "" if layout.dp == 1 else f" over all {layout.dp} DP ranks; DP rank 0"
            self.log(f"skipped {skipped} distinct samples{where}: {loader.summary()}")
        if exit_code == 0:
            self._write_exit_status(0, "done", f"{cfg.train.steps} steps of {cfg.stage.name}")
            self.log(f"done: {cfg.train.steps} steps of {cfg.stage.name}; checkpoints in {self.checkpoints.root}")
        else:
            self._write_exit_status(exit_code, "signal", f"signal {self.stop_signal or 'on a peer rank'}: "
                                    f"checkpoint written at step {progress.step}")
        return exit_code

    def _loop(self, engine, scheduler, loader, batches, metrics, tokenizer_path: Path) -> int:
        cfg, layout, progress = self.cfg, self.layout, self.progress
        interval = {"tokens": 0, "samples": 0, "flops": 0.0, "steps": 0, "fill": 0.0}
        metrics.start_interval()
        probed: list[NeoBatch] | None = None  # the next step's batches, drawn by a checkpoint's probe
        while progress.step < cfg.train.steps:
            host = probed if probed is not None else [next(batches) for _ in range(layout.num_microbatches)]
            probed = None
            micro = [self._to_device(b) for b in host]
            loss = forward_backward(self.model, micro, cfg.stage.loss_reduction, grad_scale=layout.dp)
            grads = main_grads(engine)
            finalize_grads(self.model, grads, reduce_data_parallel=False)
            loss = self._broadcast_loss(loss)
            skip, spike = self._judge(loss, [g for _, g in grads])
            step = progress.step + 1
            if skip is None:
                engine.set_gradient_accumulation_boundary(True)
                engine.allreduce_gradients()
                engine.step()
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
                self.skipped_in_a_row = 0
                self.all_non_finite = True
                self.losses.add(loss)
            else:
                engine.zero_grad()
                self.model.zero_grad(set_to_none=True)
                progress.skipped_steps += 1
                self.skipped_in_a_row += 1
                self.all_non_finite = self.all_non_finite and skip == NON_FINITE
                grad_norm = float("nan")
                self.log(f"step {step}: {skip}, update skipped ({self.skipped_in_a_row} in a row)")
                self._trouble(step, skip)
                if self.skipped_in_a_row >= cfg.train.max_skipped_steps:
                    kind = "non-finite" if self.all_non_finite else "skipped"
                    raise NonFiniteError(
                        f"{self.skipped_in_a_row} {kind} steps in a row (train.max_skipped_steps): stopping "
                        f"without writing a checkpoint of these weights. {self._restart_advice()}")
            if spike is not None:
                self.log(f"step {step}: loss {loss:.4g} is a spike ({spike})")
                self._trouble(step, f"a loss spike ({loss:.4g})")
            self.model.zero_grad(set_to_none=True)
            progress.step += 1
            tokens, samples, fill, flops = self._step_counts(host)
            progress.consumed_samples += samples
            interval["tokens"] += tokens
            interval["samples"] += samples
            interval["flops"] += flops
            interval["fill"] += fill
            interval["steps"] += 1
            if progress.step % cfg.log.every == 0 or progress.step == cfg.train.steps:
                metrics.log(progress.step, {
                    "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "pack_fill": interval["fill"] / interval["steps"], "skipped_steps": progress.skipped_steps,
                    "skipped_samples": self._skipped_samples(loader),
                    "consumed_samples": progress.consumed_samples,
                }, interval["tokens"], interval["samples"], interval["flops"], interval["steps"])
                interval = {"tokens": 0, "samples": 0, "flops": 0.0, "steps": 0, "fill": 0.0}
            stop = self._stop_requested()
            final = progress.step == cfg.train.steps
            if stop or final or self.save_owed or progress.step % cfg.checkpoint.every == 0:
                written, probed = self._checkpoint(engine, loader, batches, tokenizer_path, skipped=skip is not None)
                if not written and final:
                    raise NonFiniteError(f"the final weights (step {progress.step}) are not good, so the final "
                                         f"checkpoint is not written. {self._restart_advice()}")
                if not written and stop:
                    raise NonFiniteError(
                        f"signal {self.stop_signal or 'on a peer rank'}: no checkpoint written at step {progress.step}: "
                        f"its weights are not good. {self._restart_advice()}", outcome="unsaved")
            if stop and not final:
                self.log(f"signal {self.stop_signal or 'on a peer rank'}: checkpoint written at step {progress.step}; "
                         f"exiting with {REQUEUE_EXIT_CODE} so the job can be requeued")
                return REQUEUE_EXIT_CODE
        return 0

    # ------------------------------------------------------------------------ nothing bad saved

    def _checkpoint(self, engine, loader, batches, tokenizer_path: Path,
                    skipped: bool) -> tuple[bool, list[NeoBatch] | None]:
        """Collective. Write the checkpoint of this step if its weights are good: the step was not
        skipped and the loss of these weights on the next step's micro-batches is finite and no
        spike. Returns (written, the micro-batches the check drew: they train the next step)."""
        step = self.progress.step
        if skipped:  # these weights are the previous step's, which just failed
            self.log(f"step {step} was skipped: no checkpoint of it; the next step that passes writes one")
            self.save_owed = True
            return False, None
        # The checkpoint holds the loader and RNG as they are now, before the check draws and runs
        # the next batches: a resumed run repeats exactly what this one does next.
        loader_state = loader.state_dict()
        rng = ckpt.rng_state()
        host, loss = self._probe(batches)
        ckpt.set_rng_state(rng)
        if host is not None:
            skip, spike = self._judge(loss, [])
            if skip is not None or spike is not None:
                why = ("a non-finite loss" if skip == NON_FINITE else skip) if skip else f"loss {loss:.4g}, a spike ({spike})"
                self.log(f"step {step}: its weights give {why} on the next step's batches: its checkpoint is "
                         f"not written; the next step that passes writes one")
                self._trouble(step + 1, f"{why} from the weights of step {step}")
                self.save_owed = True
                return False, host
        self.last_good = self.checkpoints.save(self.progress, self.model, engine, _LoaderStateAt(loader_state),
                                               tokenizer_path)
        self.save_owed = False
        self.trouble_since = None
        return True, host

    def _probe(self, batches) -> tuple[list[NeoBatch] | None, float]:
        """Collective. The next step's micro-batches and the loss of the current weights on them
        (forward only; no gradient, no update). (None, nan) when the data is exhausted."""
        try:
            host = [next(batches) for _ in range(self.layout.num_microbatches)]
        except StopIteration:
            self.log("no batch left to check the weights on: the checkpoint is written unchecked")
            return None, float("nan")
        with torch.no_grad():
            loss = forward_backward(self.model, [self._to_device(b) for b in host], self.cfg.stage.loss_reduction,
                                    forward_only=True, grad_scale=self.layout.dp)
        return host, self._broadcast_loss(loss)

    def _trouble(self, step: int, what: str) -> None:
        """A skipped step or a spike at ``step``: the first after a good stretch pins the newest
        checkpoint written before it, so that rotation keeps it."""
        if self.trouble_since is not None:
            return
        self.trouble_since = step
        if self.last_good is None:
            return
        pinned = False
        if self.rank == 0:
            pinned = ckpt.pin_last_good(self.checkpoints.root, self.last_good, f"{what} at step {step}")
        if pinned:
            self.log(f"{self.last_good} is the last good checkpoint before step {step}: checkpoint rotation keeps it "
                     f"({self.checkpoints.root / ckpt.LAST_GOOD})")

    def _skipped_samples(self, loader) -> int:
        """Collective over DP: distinct samples skipped so far (too long or failed) on all DP ranks,
        which read disjoint samples."""
        count = torch.tensor([float(loader.stats()["skipped_samples"])], dtype=torch.float64, device=self.device)
        dist.all_reduce(count, group=ps.get_data_parallel_group())
        return int(count.item())

    def _restart_advice(self) -> str:
        if self.last_good is None:
            return ("No checkpoint of this run comes before the trouble (from step "
                    f"{self.trouble_since}): start it again with settings that do not diverge (a lower optim.lr).")
        match = ckpt.STEP_DIR.match(self.last_good.name)
        step = int(match.group(1)) if match else "?"
        return (f"The last good checkpoint is {self.last_good} (step {step}; the trouble began at step "
                f"{self.trouble_since}); checkpoint rotation keeps it. Restart from it with settings that do not "
                f"diverge: checkpoint.resume={self.last_good} and a lower optim.lr with "
                f"checkpoint.override_schedule=true (a changed schedule is refused on resume without it)")

    def _write_exit_status(self, code: int, outcome: str, message: str) -> None:
        """Rank 0: run_dir/exit_status.json, how this run ended (written atomically)."""
        if self.rank != 0:
            return
        record = {"exit_code": code, "outcome": outcome, "step": self.progress.step,
                  "last_good_checkpoint": str(self.last_good) if self.last_good is not None else None,
                  "message": message}
        path = self.run_dir / EXIT_STATUS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)

    def _shared_run_id(self) -> str:
        """One W&B run id for the whole run, kept in run_dir so restarts continue the same run."""
        path = self.run_dir / "wandb_run_id"
        if self.rank == 0 and not path.is_file():
            path.write_text(uuid.uuid4().hex[:12])
        dist.barrier()
        return path.read_text().strip()

    def _to_device(self, batch: NeoBatch) -> NeoBatch:
        """THE host -> device crossing of training data (asynchronous from the loader's pinned memory)."""
        return batch.to(self.device)

    def _step_counts(self, host: list[NeoBatch]) -> tuple[int, int, float, float]:
        """(real tokens, samples, pack fill, useful FLOPs) of the whole step, over all DP ranks.
        Counted on the host copies of the batches, so only the all-reduce touches the device."""
        counts = [0.0, 0.0, 0.0, float(step_flops(self.cfg.model, host, self.cfg.stage.trainable).total)]
        for b in host:
            real = b.doc_ids >= 0
            for i, n in enumerate((real.sum(), (real & _doc_starts(b.doc_ids)).sum(), b.tokens.numel())):
                counts[i] += float(n)
        local = torch.tensor(counts, dtype=torch.float64, device=self.device)
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        tokens, samples, slots, flops = local.tolist()
        return int(tokens), int(samples), tokens / max(1.0, slots), flops


def _doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def train(cfg: Config, layout: Layout, memory_plan: dict | None = None) -> int:
    """Entry point for one rank (torch.distributed already initialised)."""
    runtime.init_model_parallel(layout.tp, layout.pp, seed=cfg.train.seed)
    started = time.perf_counter()
    try:
        code = Trainer(cfg, layout, memory_plan).run()
    finally:
        runtime.destroy_model_parallel()
    if dist.get_rank() == 0:
        print(f"wall time {time.perf_counter() - started:.1f}s", flush=True)
    return code
