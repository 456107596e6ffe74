"""Learning rate: linear warm-up from 0, then cosine decay to ``min_lr_ratio * lr`` (the NEO recipe)."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based: the first update uses 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int, warmup: float) -> int:
    """``warmup`` >= 1 is a step count (stage 1: 1000); below 1 a fraction of the run (3%)."""
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))
