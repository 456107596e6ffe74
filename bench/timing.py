"""Side-by-side timing on a shared, noisy machine: candidates run interleaved, medians reported.

Other work (test suites, other engineers) comes and goes on these machines. Timing candidate A
for a minute and then B for a minute would hand whichever ran during a quiet spell an unfair
advantage; interleaving (A B B A A B ...) exposes both to the same load, so their *ratio*
stays meaningful even when the absolute numbers wobble. Each candidate is a callable that does
one unit of work (a training step, N batches, one save) and returns nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                budget_s: float | None = None, max_repeats: int = 60,
                cpu_seconds: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every candidate: ``warmup`` untimed calls each, then timed rounds,
    ABBA-ordered (the order flips every round, so a slow drift hits both equally).

    ``repeats`` rounds at least; with ``budget_s``, as many more (up to ``max_repeats``) as fit in
    about that many seconds judging by the last warm-up round: short steps get more samples, which
    is what makes medians hold up on a busy machine. ``cpu_seconds``, if given, receives this
    process's CPU time per call (all its threads): unlike wall time it does not grow while the
    process waits for a core, so on a shared machine it tracks the work a step costs."""
    names = list(candidates)
    last: dict[str, float] = {}
    for _ in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            candidates[name]()
            last[name] = time.perf_counter() - t0
    if budget_s is not None and last:
        repeats = max(repeats, min(max_repeats, int(budget_s / max(sum(last.values()), 1e-6))))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu = cpu_seconds if cpu_seconds is not None else {}
    for name in names:
        cpu[name] = []
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            c0, t0 = time.process_time(), time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return seconds


def paired_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of baseline_time / ours_time (each round's two runs were neighbours in
    time, so a burst of outside load that hits one round mostly cancels in its own ratio)."""
    return statistics.median(b / a for a, b in zip(ours, baseline, strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """'median (min-max, n=k)' for the notes column."""
    return f"n={len(values)}, min {min(values):.3g}s, max {max(values):.3g}s"
