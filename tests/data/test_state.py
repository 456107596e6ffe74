"""Savable loader state: plain JSON-able, identical next batches after a restore in a fresh
process (0 and 1 workers), refused on another layout."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.data import LoaderConfig, LoaderStateError, NeoDataLoader
from pretrain.data.state import from_plain, to_plain

REPO = Path(__file__).resolve().parents[2]
BEFORE, AFTER = 3, 3


def config(path, **kw) -> LoaderConfig:
    base = {
        "path": str(path),
        "seq_len": 128,
        "micro_batch_size": 2,
        "num_workers": 0,
        "seed": 11,
        "packing_buffer_size": 12,
        "shuffle_buffer_size": 16,
        "max_samples_per_sequence": 4,
    }
    return LoaderConfig(**{**base, **kw})


def assert_same_batches(expected: list[dict], got: list[dict]) -> None:
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert [tuple(k) for k in e["keys"]] == [tuple(k) for k in g["keys"]]
        for name in ("tokens", "labels", "loss_mask", "doc_ids", "image_ids", "image_grids", "patches"):
            a, b = e[name], g[name]
            assert (a is None and b is None) or torch.equal(a, b), name


def test_restore_in_fresh_process_gives_the_uninterrupted_batches(synthetic, blend_yaml, tokenizer, tmp_path):
    """0 and 1 workers on a shard dir, and 1 worker on a weighted blend (its RNG state too)."""
    runs, expected = [], {}
    blend = {"path": str(blend_yaml), "tokenizer": str(synthetic / "tokenizer")}
    for name, workers, extra in (("w0", 0, {}), ("w1", 1, {}), ("blend", 1, blend)):
        cfg = dataclasses.replace(config(synthetic, num_workers=workers), **extra)
        loader = NeoDataLoader(cfg, dp_rank=1, dp_size=2, tokenizer=tokenizer)
        for _ in range(BEFORE):
            next(loader)
        state = loader.state_dict()
        text = json.dumps(state)  # plain data: json can hold it as it is
        (tmp_path / f"{name}.json").write_text(text)
        stats_at_save = dataclasses.asdict(loader.totals)
        batches = []
        for _ in range(AFTER):
            batch = next(loader)
            batches.append({"keys": loader.last.keys, **vars(batch)})
        expected[name] = (batches, dataclasses.asdict(loader.totals), stats_at_save)
        loader.close()
        runs.append(
            {
                "name": name,
                "config": dataclasses.asdict(cfg),
                "dp_rank": 1,
                "dp_size": 2,
                "state": str(tmp_path / f"{name}.json"),
                "batches": AFTER,
            }
        )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(runs))
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.data.restore_child", str(spec), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    for name, (batches, stats, stats_at_save) in expected.items():
        assert_same_batches(batches, got[name]["batches"])
        assert got[name]["stats"] == stats  # counters resume too
        assert stats_at_save["batches"] == BEFORE


def test_state_is_plain_data_and_round_trips(synthetic, tokenizer, tmp_path):
    """With a worker process the state holds RNG states (a torch tensor, a numpy array, tuples,
    bytes): all of it becomes plain data that torch.load(weights_only=True) accepts."""
    loader = NeoDataLoader(config(synthetic, num_workers=1), tokenizer=tokenizer)
    next(loader)
    state = loader.state_dict()
    raw = loader._loader.save_state_rank()
    loader.close()
    plain = to_plain(raw)
    assert to_plain(from_plain(plain)) == plain
    assert json.loads(json.dumps(plain)) == plain
    torch.save({"data": state}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"] == state
    text = json.dumps(plain)
    assert '"__tensor__"' in text and '"__ndarray__"' in text  # the worker's RNG states made it
    with pytest.raises(TypeError, match="cannot store"):
        to_plain({"x": object()})
    with pytest.raises(ValueError, match="unknown state class"):
        from_plain({"__dataclass__": "Popen", "fields": {}})


def test_restore_on_another_layout_is_refused(synthetic, tokenizer):
    saved = NeoDataLoader(config(synthetic), dp_rank=0, dp_size=2, tokenizer=tokenizer)
    next(saved)
    state = saved.state_dict()
    # DP size 2 -> 1: Energon alone would accept it and serve samples again.
    with pytest.raises(LoaderStateError, match=r"dp_size: saved 2, now 1.*energon checkpoint redist"):
        NeoDataLoader(config(synthetic), dp_rank=0, dp_size=1, tokenizer=tokenizer).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="dp_rank: saved 0, now 1"):
        NeoDataLoader(config(synthetic), dp_rank=1, dp_size=2, tokenizer=tokenizer).load_state_dict(state)
    for change, message in (
        ({"num_workers": 1}, "num_workers: saved 0, now 1"),
        ({"micro_batch_size": 1}, "micro_batch_size: saved 2, now 1"),
        ({"seq_len": 256}, "seq_len: saved 128, now 256"),
        ({"seed": 12}, "seed 11"),
    ):
        with pytest.raises(LoaderStateError, match=message):
            NeoDataLoader(
                config(synthetic, **change), dp_rank=0, dp_size=2, tokenizer=tokenizer
            ).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="not a loader state"):
        NeoDataLoader(config(synthetic), dp_rank=0, dp_size=2, tokenizer=tokenizer).load_state_dict({"x": 1})
    # A state taken before the first batch restores to the beginning.
    untouched = NeoDataLoader(config(synthetic), dp_rank=0, dp_size=2, tokenizer=tokenizer)
    early = untouched.state_dict()
    first = next(untouched)
    again = NeoDataLoader(config(synthetic), dp_rank=0, dp_size=2, tokenizer=tokenizer)
    again.load_state_dict(json.loads(json.dumps(early)))
    assert torch.equal(next(again).tokens, first.tokens)
    # Same layout works; but not once batches have been drawn.
    fresh = NeoDataLoader(config(synthetic), dp_rank=0, dp_size=2, tokenizer=tokenizer)
    fresh.load_state_dict(state)
    next(fresh)
    with pytest.raises(RuntimeError, match="before the first batch"):
        fresh.load_state_dict(state)
