"""Training metrics for people: one console line per log interval, ``metrics.jsonl`` (one JSON object
per line, for plots without W&B) and Weights & Biases (offline by default, rank 0 only).

TFLOP/s per device divides the useful model FLOPs of the interval (``pretrain.flops.step_flops``:
attention over the pairs the native mask allows, the LM head on supervised tokens, no weight
gradients for frozen roles; whole model per data-parallel rank, summed over those ranks) by the wall
time and the number of devices.
MFU is that over ``cluster.peak_tflops``, and only reported when a peak is configured (> 0) for the
device: without one (CPU runs, unknown hardware) metrics.jsonl has no ``mfu`` and the console shows
``MFU -`` instead of a percentage of someone else's peak.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch


def memory_gb() -> float:
    """Peak accelerator memory, or this process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


class Metrics:
    """Rank 0 writes; other ranks hold a Metrics too but every method is a no-op for them."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, run_id: str, world_size: int):
        self.enabled = enabled
        self.cfg = cfg
        self.world_size = world_size
        self.wandb = None
        self.jsonl = None
        self._last = time.perf_counter()
        self.planned_memory_gb: float | None = None  # pretrain.plan's prediction for this rank, if known
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity or None,
                name=cfg.wandb.name or None,
                id=run_id,
                resume="allow",
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                config=asdict(cfg),  # the resolved config: it holds no secret (keys live in the environment)
            )

    def start_interval(self) -> None:
        self._last = time.perf_counter()

    def log(self, step: int, values: dict, tokens: int, samples: int, flops: float, steps_in_interval: int) -> None:
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self._last, 1e-9)
        self._last = time.perf_counter()
        row = {
            "step": step,
            **values,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "tflops_per_device": flops / elapsed / self.world_size / 1e12,
            "step_time_s": elapsed / max(1, steps_in_interval),
            "memory_gb": memory_gb(),
        }
        if self.planned_memory_gb is not None:
            row["planned_memory_gb"] = self.planned_memory_gb
        if self.cfg.cluster.peak_tflops > 0:
            row["mfu"] = row["tflops_per_device"] / self.cfg.cluster.peak_tflops
        self.jsonl.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        print(self.line(row, self.cfg.train.steps), flush=True)

    @staticmethod
    def line(row: dict, total_steps: int) -> str:
        loss = row.get("loss")
        loss_s = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else str(loss)
        mfu = f"{100 * row['mfu']:.2f}%" if "mfu" in row else "-"
        plan = f" (plan {row['planned_memory_gb']:.2f})" if "planned_memory_gb" in row else ""
        return (f"step {row['step']}/{total_steps} | loss {loss_s} | lr {row['lr']:.2e} | gnorm {row['grad_norm']:.3f}"
                f" | {row['tokens_per_s']:,.0f} tok/s | {row['samples_per_s']:.1f} samples/s"
                f" | {row['tflops_per_device']:.4g} TFLOP/s/dev | MFU {mfu}"
                f" | fill {100 * row.get('pack_fill', 0):.0f}% | mem {row['memory_gb']:.2f} GB{plan}"
                f" | skipped {row.get('skipped_steps', 0)} steps, {row.get('skipped_samples', 0)} samples")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
