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
    return dist.get_rank(), dist.get_world_size(), x.item()


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


def test_returns_each_ranks_value():
    assert spawn.run(_sum_of_ranks, 2, timeout=60) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_crashing_rank_reported_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(spawn.RankFailure) as err:
        spawn.run(_rank1_raises, 2, timeout=60)
    msg = str(err.value)
    assert "rank 1 failed first" in msg
    assert "ValueError: boom on rank 1" in msg and "_rank1_raises" in msg
    assert time.monotonic() - start < 60


def test_hung_rank_reported_with_its_stack_within_timeout():
    # 30 s: the ranks must get past start-up (import torch + megatron, join the group) before
    # the timeout for their stack to show the hang; on a loaded 2-core machine that took ~20 s.
    start = time.monotonic()
    with pytest.raises(spawn.RankFailure) as err:
        spawn.run(_rank1_hangs, 2, timeout=30)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert "rank 1 hung after the 30s timeout" in msg
    assert "_stuck_here_forever" in msg  # faulthandler's dump of the live stack
    assert elapsed < 30 + 10, f"harness took {elapsed:.0f}s to give up"


def test_rank_killed_without_traceback_is_reported():
    with pytest.raises(spawn.RankFailure) as err:
        spawn.run(_rank0_killed, 2, timeout=60)
    assert "rank 0 died with exit code -9" in str(err.value)
