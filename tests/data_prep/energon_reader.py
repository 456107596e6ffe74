"""Read a built directory back through Megatron-Energon, raw bytes per member (no decoding)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path


def read_with_energon(path: Path) -> dict[str, dict[str, bytes]]:
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        Sample,
        WorkerConfig,
        basic_sample_keys,
        get_loader,
        get_train_dataset,
        stateless,
    )

    @dataclasses.dataclass
    class RawSample(Sample):
        parts: dict

    @stateless
    def cook(raw: dict) -> RawSample:
        return RawSample(
            **basic_sample_keys(raw), parts={k: v for k, v in raw.items() if not k.startswith("__")}
        )

    class RawEncoder(DefaultTaskEncoder):
        cookers = [Cooker(cook)]
        decoder = None  # hand over the bytes as stored

        def batch(self, samples):
            return samples

    dataset = get_train_dataset(
        path,
        split_part="train",
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        task_encoder=RawEncoder(),
        repeat=False,
    )
    out: dict[str, dict[str, bytes]] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")  # CPU-only machine
        for sample in get_loader(dataset):
            assert sample.__key__ not in out
            out[sample.__key__] = sample.parts
    return out
