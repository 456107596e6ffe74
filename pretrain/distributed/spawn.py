"""Run a function in N real, freshly spawned ranks of one process group, with a hard timeout.

This is how tests (and benchmarks) exercise the real distributed code on one machine: every rank
is a separate ``spawn``-ed Python process that joins a gloo/NCCL group through
``runtime.init_distributed`` and runs ``fn(*args)``. Failures are reported as the user needs them:
the first rank that raised, with its traceback and the tail of its log; a rank that died without a
word (segfault, kill -9), with its exit code; and on timeout the live stack of every hung rank
(dumped by faulthandler on SIGUSR1) before the group is killed. Start-up (spawn, imports, joining
the group) has its own budget, so a loaded machine does not eat into the time ``fn`` is given.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_GRACE_S = 10.0  # after one rank fails, how long the others get to finish or fail on their own
_LOG_TAIL = 4000


class RankFailure(RuntimeError):
    """One or more ranks failed, crashed or hung. The message carries what they left behind."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, args: tuple, rank: int, log_path: str, results: mp.Queue) -> None:
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)

    import torch

    from pretrain.distributed import runtime

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        runtime.init_distributed()
        results.put((rank, "ready", None))
        # By value: a queue would pass tensors as shared-memory file descriptors that the parent
        # fetches from this process, which may have exited by then ("No such file or directory").
        value = pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)
        results.put((rank, "ok", value))
    except BaseException:
        tb = traceback.format_exc()
        print(tb, flush=True)
        results.put((rank, "error", tb))
        return
    try:
        runtime.shutdown()
    except Exception:  # a clean result is not spoiled by teardown noise
        traceback.print_exc()


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-_LOG_TAIL:] if len(text) > _LOG_TAIL else text


def _kill_tree(proc: mp.Process) -> None:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [*children, parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _report(errors: dict[int, str], hung: list[int], nprocs: int, why_hung: str, log_dir: Path) -> str:
    """The first failure in full (the root cause; peers usually fail *because* of it), then one
    line per other failed rank, then the live stacks of hung ranks."""
    lines = [f"{len(errors)} rank(s) failed, {len(hung)} hung (of {nprocs}); full logs in {log_dir}"]
    order = list(errors)  # insertion order = order in which failures were seen
    if order:
        first = order[0]
        lines += [f"--- rank {first} failed first:", errors[first].rstrip()]
        for r in order[1:]:
            last = errors[r].strip().splitlines()[-1] if errors[r].strip() else "?"
            lines.append(f"--- rank {r} failed too: {last}")
    for r in hung:
        lines += [f"--- rank {r} hung {why_hung}; its log and stacks:", _tail(log_dir / f"rank{r}.log")]
    return "\n".join(lines)


def run(
    fn: Callable[..., Any],
    nprocs: int,
    *,
    args: tuple = (),
    timeout: float = 300.0,
    startup_timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` ranks; return the per-rank return values, rank order.

    ``timeout`` counts from the moment every rank has joined the group; ``startup_timeout`` bounds
    getting there.

    ``fn`` must be importable by module path (a module-level function). torch.distributed is
    initialised before it runs and torn down after; megatron layouts are ``fn``'s business.
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    log_dir = Path(tempfile.mkdtemp(prefix="neo-ranks-"))
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nprocs),
        "LOCAL_WORLD_SIZE": str(nprocs),
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nprocs)),
        **(env or {}),
    }
    procs: list[mp.Process] = []
    saved = dict(os.environ)
    try:
        for rank in range(nprocs):
            # Spawned children inherit os.environ at start(): set the rank's variables around it.
            os.environ.update(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            p = ctx.Process(
                target=_rank_main,
                args=(fn, args, rank, str(log_dir / f"rank{rank}.log"), results),
                name=f"rank{rank}",
                daemon=False,
            )
            p.start()
            procs.append(p)
    finally:
        os.environ.clear()
        os.environ.update(saved)

    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    ready: set[int] = set()
    deadline = time.monotonic() + startup_timeout
    first_failure_at: float | None = None

    def take(rank: int, status: str, payload: Any) -> None:
        nonlocal deadline, first_failure_at
        if status == "ready":
            ready.add(rank)
            if len(ready) == nprocs:
                deadline = time.monotonic() + timeout
            return
        if status == "ok":
            values[rank] = pickle.loads(payload)  # our own child's return value (see _rank_main)
        else:
            errors[rank] = payload
        if status != "ok" and first_failure_at is None:
            first_failure_at = time.monotonic()

    try:
        while len(values) + len(errors) < nprocs:
            now = time.monotonic()
            if now > deadline or (first_failure_at is not None and now > first_failure_at + _GRACE_S):
                break
            try:
                take(*results.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            for rank, p in enumerate(procs):
                if rank not in values and rank not in errors and p.exitcode is not None:
                    # Exited without a report: killed, segfaulted or os._exit(). Give the queue a
                    # moment in case its report is still in flight.
                    time.sleep(0.5)
                    try:
                        while True:
                            take(*results.get_nowait())
                    except queue.Empty:
                        pass
                    if rank not in values and rank not in errors:
                        errors[rank] = f"rank {rank} died with exit code {p.exitcode} and no Python traceback"
                    if first_failure_at is None:
                        first_failure_at = time.monotonic()

        hung = [r for r in range(nprocs) if r not in values and r not in errors]
        if hung:
            for r in hung:
                if procs[r].is_alive():
                    os.kill(procs[r].pid, signal.SIGUSR1)  # faulthandler: dump every thread's stack
            time.sleep(1.0)
        for p in procs:
            p.join(timeout=5 if not (errors or hung) else 0.1)
    finally:
        for p in procs:
            if p.is_alive():
                _kill_tree(p)
        for p in procs:
            p.join(timeout=5)
        results.close()

    if errors or hung:
        if first_failure_at is not None:
            why_hung = "after a peer failed"
        elif len(ready) < nprocs:
            why_hung = f"during start-up (not every rank joined the group within {startup_timeout:.0f}s)"
        else:
            why_hung = f"after the {timeout:.0f}s timeout"
        raise RankFailure(_report(errors, hung, nprocs, why_hung, log_dir))
    shutil.rmtree(log_dir, ignore_errors=True)
    return [values[r] for r in range(nprocs)]
