"""Data-loader worker processes never die of a signal meant for their rank.

A stop signal is meant for the training process (the rank): SIGTERM/SIGUSR1 make it finish its
step, write a checkpoint and exit 85 (``pretrain.trainer``); SIGINT raises KeyboardInterrupt in it.
The loader's worker processes are the rank's forked children, in the rank's process group, and
they receive the same signals:

- torchrun forwards a signal to each rank with ``os.killpg`` (every rank runs in a session of its
  own), so the rank's whole group gets it, workers included;
- SLURM signals every process of a job step (``scancel``), a terminal its foreground group (Ctrl-C).

Torch's workers install a SIGTERM handler that dies by the signal unless the rank itself sent it,
and SIGUSR1's default action is to terminate. Either way the rank's next batch failed with
``RuntimeError: DataLoader worker (pid ...) is killed by signal: Terminated`` and the run died
without its checkpoint. ``ignore_stop_signals`` (run in each worker, after torch's own set-up, by
``worker_init_fn``) makes a worker ignore SIGTERM, SIGINT and SIGUSR1 from anyone but its rank:
it keeps producing batches while the rank finishes its step and saves. A SIGTERM from the rank
itself still ends it at once, as torch's handler did: that is how the rank stops its workers on
the way out (``multiprocessing`` terminates daemonic children at exit and then waits for them; a
worker ignoring that SIGTERM would hang the rank's exit). Workers also exit when the rank shuts
its loader down, or within seconds of the rank's death (torch's worker watchdog), and a SIGKILL
kills them, as it should.

How: the stop signals are blocked in the worker and a daemon thread takes them with
``sigwaitinfo``, which says who sent each one (a plain Python handler cannot).

Use: the ``torch.utils.data.DataLoader`` gets ``worker_init_fn=worker_init_fn``, or, when something
else (Energon) builds it with its own ``worker_init_fn``, ``protect(dataloader)`` before its first
batch chains ours after theirs.
"""

from __future__ import annotations

import os
import signal
import threading

# The signals that stop a rank (or interrupt it): never the workers' business.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """In a worker process (its only thread, right after the fork): from now on the stop signals
    sent by anyone but the parent (the rank) are ignored, and a SIGTERM from the parent ends the
    worker at once (exit status 0, as torch's own worker handler does)."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started from here inherit it
    threading.Thread(target=_take_stop_signals, args=(parent,), name="neo-stop-signals", daemon=True).start()


def _take_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # the rank is shutting its workers down


def worker_init_fn(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)`` for a loader that has no init function of its own."""
    ignore_stop_signals()


class ChainedWorkerInit:
    """A ``worker_init_fn`` that ignores the stop signals, then runs the loader's own one (Energon's
    seeds its workers: it must still run). Picklable if the inner one is (spawn start method)."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if self.inner is not None:
            self.inner(worker_id)

    def __repr__(self) -> str:
        return f"ChainedWorkerInit({self.inner!r})"


def protect(dataloader) -> bool:
    """Make ``dataloader``'s worker processes ignore the stop signals. Call it before the first
    batch is drawn (workers read ``worker_init_fn`` when they start). Idempotent; returns whether
    the loader's workers are now protected (False for None or a loader without workers)."""
    if dataloader is None or getattr(dataloader, "num_workers", 0) == 0:
        return False
    current = getattr(dataloader, "worker_init_fn", None)
    if current is worker_init_fn or isinstance(current, ChainedWorkerInit):
        return True
    dataloader.worker_init_fn = ChainedWorkerInit(current)
    return True
