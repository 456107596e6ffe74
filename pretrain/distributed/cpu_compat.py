"""Run megatron-core and DeepSpeed on machines without CUDA (tests, the demo, CI).

megatron-core assumes a GPU in a handful of places: receive buffers and rotary caches are
allocated on ``torch.cuda.current_device()``, schedules and masks say ``device="cuda"`` or call
``.cuda()``, the RNG tracker saves and restores the CUDA generator, checkpointing synchronises the
device and starts a *spawn* multiprocessing Manager; DeepSpeed compiles a CPU shared-memory op
on first use. Every one of those is redirected here, once,
before any megatron code runs, and only when CUDA is absent (``apply()`` is a no-op otherwise).
The model, data and trainer code never know about it; see shared/notes/PLATFORM.md for the facts
each patch rests on.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Maps hard-coded CUDA placements (``device="cuda"``, ``.cuda()``, ``.to("cuda")``) to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed) -> None:
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay the real one.
    torch.default_generator.manual_seed(int(seed))


def _fork_results_queue():
    """dist_checkpointing's writer results queue on a fork-context Manager.

    The stock one uses a spawn Manager: 10-15 s per save, and a hang when the entry script lacks
    an ``if __name__ == "__main__"`` guard. Forking is safe here because no CUDA context exists.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if fa._results_queue is None:
        fa._results_queue = mp.get_context("fork").Manager().Queue()
    return fa._results_queue


def apply() -> bool:
    """Install the CPU compatibility layer if CUDA is absent. Idempotent; returns whether active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # The CUDA RNG (saved/forked by megatron's RNG tracker around every TP region) becomes the CPU
    # generator. manual_seed_all is deliberately left alone (torch.manual_seed calls it).
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = torch.cuda.random.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = torch.cuda.random.manual_seed = _cpu_manual_seed

    # DeepSpeed on its CPU accelerator compiles a shared-memory all-reduce op the first time a
    # process uses its comm layer (50-85 s, and racing ranks). gloo does the reductions we need.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    filesystem_async._get_write_results_queue = _fork_results_queue

    _CudaToCpu().__enter__()  # stays on the mode stack for the life of the process
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
