"""Checkpoint files are data, never code: every pickle in a checkpoint is read through a whitelist.

A checkpoint may come from someone else (a shared run directory, a download), and a pickle can
run anything while it loads. Each pickled file of ours, and how it is read here:

    model/.metadata             torch.distributed.checkpoint's plan of the shards: a plain pickle that
                                torch reads with ``pickle.load``. ``check_weights`` first unpickles it
                                with ``RestrictedUnpickler``, which admits only the classes
                                dist_checkpointing writes (``DCP_METADATA``).
    model/__*.distcp (bytes)    the non-tensor items (megatron's ``_extra_state``), which torch's load
                                planner reads with ``torch.load(weights_only=False)``: ``check_weights``
                                loads each one first with ``weights_only=True``.
    model/common.pt             megatron reads it with torch.load's default, ``weights_only=True``.
    optimizer/zero/*.pt         DeepSpeed's ZeRO files: ``RestrictedCheckpointEngine`` replaces
                                DeepSpeed's loader with ``weights_only=True`` plus the three DeepSpeed
                                records they hold (``fragment_address``, ``LossScaler``,
                                ``ZeroStageEnum``).
    rng/rank_*.pt               ``load_torch`` (``weights_only=True``).

torch.distributed.checkpoint offers no hook for its unpickling, so its two pickles are checked
before it reads them: the same bytes, just hashed against the manifest (``checkpointer.verify``)
and read again by torch a moment later. A file that asks for anything else is refused with one
line naming the file and the class it asked for.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from pretrain.checkpoint.checkpointer import CheckpointError

# What torch.distributed.checkpoint pickles into .metadata (torch 2.13, through megatron-core).
DCP_METADATA = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name ("torch.strided") to the object
    ("collections", "OrderedDict"),
}


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file asks to load something no checkpoint of ours holds."""

    def __init__(self, path: Path | str, what: str):
        super().__init__(f"{path}: refused to load: it asks for {what}, which no checkpoint of ours contains "
                         "(the file is crafted or from elsewhere; nothing was run)")


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only whitelisted globals (and torch dtypes)."""

    def __init__(self, file, allowed: set[tuple[str, str]], path: Path | str):
        super().__init__(file)
        self.allowed, self.path = allowed, path

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedCheckpointError(self.path, f"{module}.{name}")


def restricted_load(path: Path, allowed: set[tuple[str, str]]):
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, allowed, path).load()
        except UntrustedCheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged pickle, whatever the exception
            raise CheckpointError(f"{path}: not a readable checkpoint file ({type(err).__name__})") from None


def _refusal(err: Exception) -> str:
    """The global torch's weights_only unpickler refused, from its (multi-line) message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else "a global outside torch's weights_only allowlist"


def load_torch(source, path: Path | str, safe_globals: tuple = (), **kwargs):
    """torch.load with ``weights_only=True`` (plus ``safe_globals``); a refusal is one line."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(path, _refusal(err)) from None


def check_weights(model_dir: Path) -> None:
    """Both pickles of a dist_checkpointing directory, before torch reads them (module docstring)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = model_dir / ".metadata"
    if not meta_path.is_file():
        raise CheckpointError(f"{model_dir} holds no .metadata: not a complete weights directory")
    metadata = restricted_load(meta_path, DCP_METADATA)
    byte_items = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn not in byte_items:
            continue
        shard = model_dir / info.relative_path
        if shard.parent != model_dir:  # a relative path that leaves the directory
            raise CheckpointError(f"{meta_path}: names a shard outside {model_dir}: {info.relative_path!r}")
        with open(shard, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        load_torch(io.BytesIO(raw), f"{shard} (item {index.fqn})")


def restricted_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine with ``weights_only=True`` loads (module docstring)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # The DeepSpeed classes its ZeRO files hold (bf16 and fp32 runs): plain records, rebuilt from
    # their fields, with no code of their own on load.
    allowed = (fragment_address, LossScaler, ZeroStageEnum)

    class RestrictedCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_torch(path, path, safe_globals=allowed, map_location=map_location)

    return RestrictedCheckpointEngine(config)
