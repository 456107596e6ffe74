"""A corrupt shard member is logged with its shard and key, counted, and skipped; the run goes on."""

from __future__ import annotations

import logging
import tarfile

import pytest
from megatron.energon.errors import FatalSampleError

from pretrain.data import LoaderConfig, NeoDataLoader
from tests.data.test_packing import all_keys


def corrupt_member(shard, name: str, data: bytes | None = None) -> None:
    """Overwrite a member's bytes in place (same length, so Energon's offset index stays valid)."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        offset, size = member.offset_data, member.size
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write((data or b"\x00garbage" * size)[:size].ljust(size, b"\x00"))


def pick_members(data_dir):
    shard = min(data_dir.glob("*.tar"))
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    jpg = next(n for n in names if n.endswith(".img0.jpg"))
    json_key = next(n for n in names if n.endswith(".json") and n.split(".")[0] != jpg.split(".")[0])
    return shard, jpg, json_key


def one_pass(path, tokenizer, workers):
    cfg = LoaderConfig(
        path=str(path),
        seq_len=256,
        micro_batch_size=2,
        num_workers=workers,
        repeat=False,
        packing_buffer_size=16,
        shuffle_buffer_size=8,
        max_samples_per_sequence=8,
    )
    loader = NeoDataLoader(cfg, tokenizer=tokenizer)
    keys = [k for _ in loader for row in loader.last.keys for k in row]
    loader.close()
    return loader, keys


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_members_are_logged_counted_and_skipped(synthetic_copy, tokenizer, caplog, workers):
    shard, jpg, bad_json = pick_members(synthetic_copy)
    corrupt_member(shard, jpg)  # an undecodable image
    corrupt_member(shard, bad_json)  # a sample JSON that does not parse
    broken = {jpg.split(".")[0], bad_json.split(".")[0]}
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader, keys = one_pass(synthetic_copy, tokenizer, workers)
    assert sorted(keys) == sorted(set(all_keys(synthetic_copy)) - broken)  # everything else trains
    assert loader.totals.sample_errors == 2
    if workers == 0:  # worker processes log to their own stderr
        messages = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
        for key in broken:
            (line,) = [m for m in messages if key in m]
            assert shard.name in line
        assert any("cannot decode image" in m for m in messages)
        assert any("does not parse" in m for m in messages)


def test_everything_broken_stops_with_fatal_sample_error(synthetic_copy, tokenizer):
    for shard in synthetic_copy.glob("*.tar"):
        with tarfile.open(shard) as tar:
            names = [n for n in tar.getnames() if n.endswith(".json")]
        for name in names:
            corrupt_member(shard, name)
    cfg = LoaderConfig(
        path=str(synthetic_copy),
        seq_len=256,
        micro_batch_size=1,
        num_workers=0,
        packing_buffer_size=4,
        shuffle_buffer_size=0,
    )
    loader = NeoDataLoader(cfg, tokenizer=tokenizer)
    logging.getLogger("pretrain.data.task_encoder").disabled = True
    try:
        with pytest.raises(FatalSampleError):
            next(loader)
    finally:
        logging.getLogger("pretrain.data.task_encoder").disabled = False
