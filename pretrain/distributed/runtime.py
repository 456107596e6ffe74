"""Process groups: torch.distributed first, then megatron-core's parallel_state on top of it.

The same code runs on GPUs (NCCL) and on CPU (gloo, with ``cpu_compat`` applied first). Model
parallel state can be torn down and rebuilt inside one process group (``model_parallel``), which
is how one multi-process launch tests several layouts.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pretrain.distributed import cpu_compat


def device() -> torch.device:
    """This rank's compute device."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group described by the launcher's environment (torchrun, SLURM, tests).

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Idempotent.
    """
    if dist.is_initialized():
        return
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"{var} is not set: launch with torchrun (or slurm/), not plain python")
    bound = {}
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
        bound = {"device_id": device()}  # NCCL communicators bind to this rank's GPU eagerly
    else:
        cpu_compat.apply()
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout_s),
        **bound,
    )


def init_model_parallel(tp: int, pp: int, seed: int = 1234, timeout_minutes: int = 10) -> None:
    """Build megatron's TP/PP/DP groups (DP = world / (tp*pp)) and seed the model-parallel RNGs.

    The RNG tracker is seeded even without dropout: megatron forks it around every TP region.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def model_parallel(tp: int, pp: int, seed: int = 1234) -> Iterator[None]:
    """A TP x PP (x derived DP) layout for the duration of the block, torn down afterwards."""
    init_model_parallel(tp, pp, seed)
    try:
        yield
        dist.barrier()  # nobody tears groups down while a peer still uses them
    finally:
        destroy_model_parallel()


def shutdown() -> None:
    """Tear everything down so the process exits cleanly (no hanging gloo/NCCL threads)."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
