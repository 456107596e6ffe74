"""The training loop: one loop for all three NEO stages, at any TP/PP/DP layout.

Per step: this DP rank's micro-batches -> megatron's pipeline schedule (forward + backward,
NEO's loss normalised over the global batch) -> gradients made whole across TP and the tied
embedding -> DeepSpeed ZeRO-1 (reduce over DP, clip by the global norm, AdamW, LR schedule) ->
metrics -> checkpoint. SIGTERM/SIGUSR1 make every rank finish the step, save and exit with
``REQUEUE_EXIT_CODE`` so a scheduler can requeue the job; the next start resumes exactly.

Devices: the model lives on ``runtime.device()``. Data crosses from host to device in one place,
``_to_device`` (the loader hands pinned batches; the copies are asynchronous). Every tensor that
enters a collective is created on the device (NCCL takes nothing else), and a step syncs the host
a fixed handful of times (loss, finite check, counts, stop flag), never per parameter.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from pretrain.checkpoint import checkpointer as ckpt
from pretrain.checkpoint.manager import CheckpointManager, Progress
from pretrain.checkpoint.weights import load_weights
from pretrain.config import Config, ConfigError, Layout
from pretrain.distributed import runtime
from pretrain.flops import step_flops
from pretrain.metrics import Metrics
from pretrain.model.neo import NeoModel, transformer_config
from pretrain.model.roles import set_trainable
from pretrain.model.batch import NeoBatch
from pretrain.optim.zero import build_engine, main_grads
from pretrain.schedule import finalize_grads, forward_backward

REQUEUE_EXIT_CODE = 85  # "checkpoint written after a signal: requeue me" (slurm/ relies on it)


class NonFiniteError(RuntimeError):
    pass


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

    # ------------------------------------------------------------------------------- set-up

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def dtype(self) -> torch.dtype:
        name = self.cfg.train.dtype
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, name)

    def tokenizer_path(self) -> Path:
        path = Path(self.cfg.tokenizer.path) if self.cfg.tokenizer.path else Path(self.cfg.data.path) / "tokenizer"
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise ConfigError(f"no tokenizer at {path}: set tokenizer.path to an HF tokenizer directory")
        return path

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

    def _all_finite(self, loss: float, grads: list[torch.Tensor]) -> bool:
        """Whether the loss and every gradient of every rank are finite: one fused reduction (the
        largest magnitude per tensor is inf or nan iff the tensor holds one; no overflow), one
        all-reduce, one host sync."""
        bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=self.device)
        if grads:
            largest = torch.stack(torch._foreach_norm(grads, float("inf"))).amax()
            bad += (~torch.isfinite(largest)).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

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
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        tokenizer_path = self.tokenizer_path()
        from pretrain.data.template import load_tokenizer

        n_tokens = len(load_tokenizer(tokenizer_path))
        if n_tokens > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer at {tokenizer_path} has {n_tokens} tokens, more than "
                              f"model.vocab_size={cfg.model.vocab_size}: the embedding has no row for the rest")
        # Signals are caught from here on: one arriving during start-up stops the run at the
        # first step boundary (with a checkpoint) instead of killing it.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        # Weights first, optimizer second (pretrain/checkpoint/manager.py says why).
        resume = self.checkpoints.resume_point()
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
        batches = iter(loader)
        interval = {"tokens": 0, "samples": 0, "flops": 0.0, "steps": 0, "fill": 0.0}
        metrics.start_interval()
        exit_code = 0
        try:
            while progress.step < cfg.train.steps:
                host = [next(batches) for _ in range(layout.num_microbatches)]
                micro = [self._to_device(b) for b in host]
                loss = forward_backward(self.model, micro, cfg.stage.loss_reduction, grad_scale=layout.dp)
                grads = main_grads(engine)
                finalize_grads(self.model, grads, reduce_data_parallel=False)
                loss = self._broadcast_loss(loss)
                if self._all_finite(loss, [g for _, g in grads]):
                    engine.set_gradient_accumulation_boundary(True)
                    engine.allreduce_gradients()
                    engine.step()
                    grad_norm = float(engine.get_global_grad_norm() or 0.0)
                    self.skipped_in_a_row = 0
                else:
                    engine.zero_grad()
                    self.model.zero_grad(set_to_none=True)
                    progress.skipped_steps += 1
                    self.skipped_in_a_row += 1
                    grad_norm = float("nan")
                    self.log(f"step {progress.step + 1}: non-finite loss or gradients, update skipped "
                             f"({self.skipped_in_a_row} in a row)")
                    if self.skipped_in_a_row >= cfg.train.max_skipped_steps:
                        raise NonFiniteError(f"{self.skipped_in_a_row} non-finite steps in a row (train.max_skipped_steps): "
                                             "stopping without writing a checkpoint of these weights")
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
                    stats = loader.stats() if hasattr(loader, "stats") else {}
                    metrics.log(progress.step, {
                        "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "pack_fill": interval["fill"] / interval["steps"], "skipped_steps": progress.skipped_steps,
                        "skipped_samples": int(stats.get("skipped_samples", 0)),
                        "consumed_samples": progress.consumed_samples,
                    }, interval["tokens"], interval["samples"], interval["flops"], interval["steps"])
                    interval = {"tokens": 0, "samples": 0, "flops": 0.0, "steps": 0, "fill": 0.0}
                stop = self._stop_requested()
                if stop or progress.step % cfg.checkpoint.every == 0 or progress.step == cfg.train.steps:
                    self.checkpoints.save(progress, self.model, engine, loader, tokenizer_path)
                if stop and progress.step < cfg.train.steps:
                    self.log(f"signal {self.stop_signal or 'on a peer rank'}: checkpoint written at step {progress.step}; "
                             f"exiting with {REQUEUE_EXIT_CODE} so the job can be requeued")
                    exit_code = REQUEUE_EXIT_CODE
                    break
        finally:
            metrics.close()
        if exit_code == 0:
            self.log(f"done: {cfg.train.steps} steps of {cfg.stage.name}; checkpoints in {self.checkpoints.root}")
        return exit_code

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
