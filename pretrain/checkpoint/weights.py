"""Model weights on disk: megatron dist_checkpointing, reshardable to any TP/PP layout.

A weights directory is written by every rank together (each writes its own shards; replicas
once) and can be read back at any layout: the sharded state dict of the model being loaded says
which global slices each rank needs. Nothing in it is loaded as code: ``restricted.check_weights``
admits the pickles torch reads here only if they hold nothing but checkpoint data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling


def save_weights(model, directory: str | Path) -> None:
    """Collective: every rank of the world calls it with the same directory."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))
    dist.barrier()


def load_weights(model, directory: str | Path) -> None:
    """Collective. The checkpoint and the model must hold exactly the same tensors (RAISE_ALL)."""
    directory = Path(directory)
    from pretrain.checkpoint.checkpointer import CheckpointError
    from pretrain.checkpoint.restricted import check_weights

    if not (directory / "metadata.json").is_file() and not any(directory.glob("*.distcp")):
        raise CheckpointError(f"{directory} holds no megatron dist checkpoint (no metadata.json)")
    check_weights(directory)
    state = dist_checkpointing.load(
        model.sharded_state_dict(), os.fspath(directory), strict=StrictHandling.RAISE_ALL
    )
    model.load_state_dict(state, strict=True)
