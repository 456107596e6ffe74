"""The multi-process harness reports what a user needs: results, the failing rank's traceback,
the stacks of a hung rank, and a rank that died without a word, always within its timeout."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch.distributed as dist

from pretrain.distributed import spawn


def _sum_of_ranks():
    t = dist.get_rank() + 1.0
    import torch

    x = torch.tensor([t])
    dist.all_reduce(x)
    # Tensors too: a queue hands each one over as shared memory that the parent fetches, one by one,
    # from the rank's process; with many it was often gone before the last. Results go by value.
    return dist.get_rank(), dist.get_world_size(), x.item(), [x + i for i in range(200)]


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that will never come


def _stuck_here_forever():
    while True:
        time.sleep(0.1)


def _rank1_hangs():
    if dist.get_rank() == 1:
        _stuck_here_forever()
    dist.barrier()


def _rank0_killed():
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


# Timeouts are generous where the test is not about them: a run returns as soon as every rank has
# reported, and start-up (spawn, import torch + megatron, join the group) can take a minute on a
# loaded 2-core machine.
_PATIENT_S = 300


def test_returns_each_ranks_value():
    values = spawn.run(_sum_of_ranks, 2, timeout=_PATIENT_S)
    assert [v[:3] for v in values] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert all([t.item() for t in v[3]] == [3.0 + i for i in range(200)] for v in values)


def test_crashing_rank_reported_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(spawn.RankFailure) as err:
        spawn.run(_rank1_raises, 2, timeout=_PATIENT_S)
    msg = str(err.value)
    assert "rank 1 failed first" in msg
    assert "ValueError: boom on rank 1" in msg and "_rank1_raises" in msg
    assert time.monotonic() - start < _PATIENT_S / 2, "the harness waited for the timeout, not the failure"


def test_hung_rank_reported_with_its_stack_within_timeout():
    # The 15 s count once every rank has joined the group, so the hung rank is surely inside fn
    # when its stack is dumped, however slow start-up was.
    start = time.monotonic()
    with pytest.raises(spawn.RankFailure) as err:
        spawn.run(_rank1_hangs, 2, timeout=15)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert "rank 1 hung after the 15s timeout" in msg
    assert "_stuck_here_forever" in msg  # faulthandler's dump of the live stack
    assert elapsed < 120, f"harness took {elapsed:.0f}s to give up"


def test_rank_killed_without_traceback_is_reported():
    with pytest.raises(spawn.RankFailure) as err:
        spawn.run(_rank0_killed, 2, timeout=_PATIENT_S)
    assert "rank 0 died with exit code -9" in str(err.value)
