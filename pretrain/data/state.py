"""Energon loader state <-> plain JSON-able data (no pickle anywhere).

Checkpoints are read with ``torch.load(weights_only=True)`` or ``json``, so the loader state must
be made of dicts, lists, strings, numbers, booleans and None only. Energon's
``SavableDataLoaderState`` is a tree of a few dataclasses, ``FlexState`` dicts, tuples, bytes,
and (with worker processes) RNG states holding a torch tensor and a numpy array. ``to_plain``
writes each of these with a small tag; ``from_plain`` rebuilds them, accepting only the
dataclasses listed in ``_DATACLASSES`` and the tensor dtypes in ``_DTYPES``: restoring never
imports or calls anything named by the data.

An unknown type fails at save time (``TypeError`` naming its path), not at restore time.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np
import torch
from megatron.energon.flavors.webdataset.sample_loader import SliceState
from megatron.energon.rng import SystemRngState
from megatron.energon.savable_loader import (
    SavableDataLoaderState,
    SavableDatasetCheckpoint,
    SavableDatasetState,
)
from megatron.energon.state import FlexState

_DATACLASSES = {
    cls.__name__: cls
    for cls in (
        SavableDataLoaderState,
        SavableDatasetCheckpoint,
        SavableDatasetState,
        SystemRngState,
        SliceState,
    )
}
_DTYPES = {
    "uint8": (torch.uint8, np.uint8),
    "int32": (torch.int32, np.int32),
    "int64": (torch.int64, np.int64),
    "uint32": (torch.uint32, np.uint32),
    "uint64": (torch.uint64, np.uint64),
    "float32": (torch.float32, np.float32),
    "float64": (torch.float64, np.float64),
    "bool": (torch.bool, np.bool_),
}
_TORCH_NAMES = {v[0]: k for k, v in _DTYPES.items()}
_NUMPY_NAMES = {np.dtype(v[1]): k for k, v in _DTYPES.items()}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_plain(obj: Any, path: str = "state") -> Any:
    """A JSON-able copy of an Energon state tree."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": _b64(bytes(obj))}
    if isinstance(obj, list):
        return [to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        tag = "__flex__" if isinstance(obj, FlexState) else "__dict__"
        if type(obj) not in (dict, FlexState):
            raise TypeError(f"{path}: cannot store a {type(obj).__qualname__} in the loader state")
        return {tag: [[to_plain(k, f"{path}.key"), to_plain(v, f"{path}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _TORCH_NAMES:
            raise TypeError(f"{path}: tensor dtype {obj.dtype} is not storable")
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": _TORCH_NAMES[t.dtype], "shape": list(t.shape), "data": _b64(raw)}
    if isinstance(obj, np.ndarray):
        if obj.dtype not in _NUMPY_NAMES:
            raise TypeError(f"{path}: array dtype {obj.dtype} is not storable")
        a = np.ascontiguousarray(obj)
        return {"__ndarray__": _NUMPY_NAMES[a.dtype], "shape": list(a.shape), "data": _b64(a.tobytes())}
    if (
        dataclasses.is_dataclass(obj)
        and type(obj).__name__ in _DATACLASSES
        and _DATACLASSES[type(obj).__name__] is type(obj)
    ):
        fields = {f.name: to_plain(getattr(obj, f.name), f"{path}.{f.name}") for f in dataclasses.fields(obj)}
        return {"__dataclass__": type(obj).__name__, "fields": fields}
    raise TypeError(
        f"{path}: cannot store a {type(obj).__module__}.{type(obj).__qualname__} in the loader state"
    )


def from_plain(data: Any, path: str = "state") -> Any:
    """Inverse of ``to_plain``."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [from_plain(v, f"{path}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict) or len(data) == 0:
        raise ValueError(f"{path}: malformed loader state entry {data!r:.80}")
    if "__bytes__" in data:
        return base64.b64decode(data["__bytes__"])
    if "__tuple__" in data:
        return tuple(from_plain(v, f"{path}[{i}]") for i, v in enumerate(data["__tuple__"]))
    if "__dict__" in data or "__flex__" in data:
        flex = "__flex__" in data
        items = {
            from_plain(k, f"{path}.key"): from_plain(v, f"{path}[{k!r}]")
            for k, v in data["__flex__" if flex else "__dict__"]
        }
        return FlexState(items) if flex else items
    if "__tensor__" in data or "__ndarray__" in data:
        is_tensor = "__tensor__" in data
        name = data["__tensor__"] if is_tensor else data["__ndarray__"]
        if name not in _DTYPES:
            raise ValueError(f"{path}: dtype {name!r} is not allowed in a loader state")
        array = (
            np.frombuffer(base64.b64decode(data["data"]), dtype=_DTYPES[name][1])
            .reshape(data["shape"])
            .copy()
        )
        return torch.from_numpy(array) if is_tensor else array
    if "__dataclass__" in data:
        cls = _DATACLASSES.get(data["__dataclass__"])
        if cls is None:
            raise ValueError(f"{path}: unknown state class {data['__dataclass__']!r}")
        return cls(**{k: from_plain(v, f"{path}.{k}") for k, v in data["fields"].items()})
    raise ValueError(f"{path}: malformed loader state entry with keys {sorted(data)}")
