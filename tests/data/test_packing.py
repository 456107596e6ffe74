"""Packing: first-fit selection never loses a sample, rows are exactly seq_len, too-long samples
are skipped and counted, fill is reported; through the real Energon loader on real shards."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from pretrain.data import LoaderConfig, NeoDataLoader
from pretrain.data.packing import Document, build_row, first_fit_decreasing
from pretrain.data.task_encoder import NeoTaskEncoder
from pretrain.data.template import ChatTemplate
from pretrain.model.batch import collate


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_partitions_and_fits(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 100])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 80))]
    bins = first_fit_decreasing(lengths, capacity)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every item exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(load <= capacity for load in loads)
    # First fit: no two bins could have been one (the later one's first item did not fit).
    assert all(a + b > capacity for i, a in enumerate(loads) for b in loads[i + 1 :])
    assert all(b == sorted(b) for b in bins) and [b[0] for b in bins] == sorted(b[0] for b in bins)
    assert bins == first_fit_decreasing(lengths, capacity)  # deterministic
    with pytest.raises(ValueError):
        first_fit_decreasing([capacity + 1], capacity)


def make_document(key: str, n: int, grids: list[tuple[int, int]], seed: int) -> Document:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 100, (n,), generator=g).numpy()
    image_ids = np.full(n, -1, dtype=np.int64)
    pos = 1
    for i, (gh, gw) in enumerate(grids):
        image_ids[pos : pos + gh * gw] = i
        pos += gh * gw + 2
    cells = sum(gh * gw for gh, gw in grids)
    return Document(
        key=key,
        tokens=tokens,
        labels=np.concatenate([tokens[1:], [0]]),
        loss_mask=np.concatenate([np.ones(n - 1, dtype=bool), [False]]),
        image_ids=image_ids,
        image_grids=np.array(grids, dtype=np.int64).reshape(-1, 2),
        patches=torch.randn(4 * cells, 768, generator=g) if cells else None,
    )


def test_build_row_layout():
    docs = [
        make_document("a", 10, [(1, 2)], 0),
        make_document("b", 5, [], 1),
        make_document("c", 20, [(2, 2), (1, 1)], 2),
    ]
    row = build_row(docs, 40, pad_id=0)
    assert row.tokens.shape == (40,) and row.tokens.dtype == torch.long
    assert row.doc_ids.tolist() == [0] * 10 + [1] * 5 + [2] * 20 + [-1] * 5
    assert row.tokens[35:].tolist() == [0] * 5 and row.labels[35:].tolist() == [0] * 5
    assert not row.loss_mask[35:].any() and row.loss_mask.dtype == torch.bool
    # Image ids renumbered across the row; grids and patches concatenated in the same order.
    assert sorted(set(row.image_ids.tolist())) == [-1, 0, 1, 2]
    assert row.image_grids.tolist() == [[1, 2], [2, 2], [1, 1]]
    assert row.patches.shape == (4 * (2 + 4 + 1), 768)
    assert torch.equal(row.patches[:8], docs[0].patches) and torch.equal(row.patches[8:], docs[2].patches)
    # Rows collate into a NeoBatch the model takes.
    batch = collate([row, build_row(docs[1:2], 40, pad_id=0)])
    assert batch.tokens.shape == (2, 40) and batch.image_grids.shape == (3, 2)
    with pytest.raises(ValueError):
        build_row(docs, 30, pad_id=0)


def test_selector_keeps_every_sample_and_carries_too_long_ones(tokenizer):
    from pretrain.data.task_encoder import RawSample

    enc = NeoTaskEncoder(tokenizer, seq_len=24)
    rng = random.Random(0)
    words = ["red", "green", "blue", "square", "circle", "two", "three"]
    raws = [
        RawSample(
            __key__=f"k{i}",
            __restore_key__=(),
            images=[],
            meta={"kind": "text", "text": " ".join(rng.choices(words, k=rng.randint(1, 30))), "images": []},
        )
        for i in range(40)
    ]
    samples = [enc.preencode_sample(r) for r in raws]
    too_long = {s.__key__ for s in samples if s.skipped}
    assert too_long and len(too_long) < len(samples)
    packs = enc.select_samples_to_pack(samples)
    keys = [s.__key__ for p in packs for s in p]
    assert sorted(keys) == sorted(s.__key__ for s in samples)  # nothing dropped, nothing twice
    for p in packs:
        assert sum(s.length for s in p if not s.skipped) <= 24
    rows = [enc.pack_selected_samples([enc.postencode_sample(s) for s in p]) for p in packs]
    assert all(r.row.tokens.shape == (24,) for r in rows)
    assert {k for r in rows for k, _ in r.skipped} == too_long
    assert sum(len(r.keys) for r in rows) == len(samples) - len(too_long)
    # A buffer of nothing but too-long samples still reports them (in one all-padding row).
    only_long = [s for s in samples if s.skipped]
    (pack,) = enc.select_samples_to_pack(only_long)
    row = enc.pack_selected_samples([enc.postencode_sample(s) for s in pack])
    assert len(row.skipped) == len(only_long) and row.real_tokens == 0 and not row.row.loss_mask.any()


def all_keys(data_dir) -> list[str]:
    keys = []
    for shard in sorted(data_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return keys


def sample_lengths(data_dir, tokenizer) -> dict[str, int]:
    template = ChatTemplate(tokenizer)
    out = {}
    for shard in sorted(data_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out[m.name.split(".")[0]] = len(template.render(json.loads(tar.extractfile(m).read())))
    return out


def one_pass(path, dp_rank, dp_size, seq_len, **kw):
    cfg = LoaderConfig(
        path=str(path),
        seq_len=seq_len,
        micro_batch_size=2,
        num_workers=0,
        repeat=False,
        packing_buffer_size=16,
        shuffle_buffer_size=8,
        max_samples_per_sequence=8,
        **kw,
    )
    loader = NeoDataLoader(cfg, dp_rank=dp_rank, dp_size=dp_size)
    batches = []
    for batch in loader:
        batches.append((batch, loader.last))
    return loader, batches


def test_epoch_across_two_dp_ranks_loses_and_duplicates_nothing(synthetic, tokenizer):
    """Count __key__s over one pass of 2 data-parallel ranks: every sample is packed exactly once
    or (too long) skipped and counted exactly once; rows are exactly seq_len; fill is reported."""
    seq_len = 40
    lengths = sample_lengths(synthetic, tokenizer)
    expected_too_long = {k for k, n in lengths.items() if n > seq_len}
    assert expected_too_long and len(expected_too_long) < len(lengths) // 2
    seen = Counter()
    skipped = 0
    per_rank = []
    for rank in range(2):
        loader, batches = one_pass(synthetic, rank, 2, seq_len)
        rank_keys = [k for _, info in batches for row in info.keys for k in row]
        per_rank.append(set(rank_keys))
        seen.update(rank_keys)
        for batch, info in batches:
            assert batch.tokens.shape[1] == seq_len
            for r, keys in enumerate(info.keys):
                real = int((batch.doc_ids[r] >= 0).sum())
                assert real == info.real_tokens[r] == sum(lengths[k] for k in keys)
                assert info.fill[r] == pytest.approx(real / seq_len)
                # Documents are contiguous runs 0..m-1, then padding.
                ids = batch.doc_ids[r][:real].tolist()
                assert ids == sorted(ids) and set(ids) == set(range(len(keys)))
        stats = loader.totals
        assert stats.samples == len(rank_keys)
        assert stats.fill == pytest.approx(
            sum(sum(i.real_tokens) for _, i in batches) / (stats.rows * seq_len)
        )
        assert 0.5 < stats.fill <= 1.0
        skipped += stats.skipped_too_long
        assert loader.stats()["skipped_samples"] == stats.skipped_too_long
        assert stats.sample_errors == 0
    assert not per_rank[0] & per_rank[1] and per_rank[0] and per_rank[1]
    assert max(seen.values()) == 1  # no duplicates
    assert set(seen) == set(all_keys(synthetic)) - expected_too_long  # no loss
    assert skipped == len(expected_too_long)


def test_same_dp_rank_gets_identical_batches_and_seed_decides_order(synthetic):
    def take(seed, n=3):
        cfg = LoaderConfig(
            path=str(synthetic),
            seq_len=128,
            micro_batch_size=2,
            num_workers=0,
            seed=seed,
            packing_buffer_size=16,
            shuffle_buffer_size=16,
            max_samples_per_sequence=4,
        )
        loader = NeoDataLoader(cfg, dp_rank=1, dp_size=2)
        out = []
        for _ in range(n):
            b = next(loader)
            out.append((b, loader.last.keys))
        return out

    a, b, c = take(1), take(1), take(2)
    for (x, kx), (y, ky) in zip(a, b):
        assert kx == ky
        for name in ("tokens", "labels", "loss_mask", "doc_ids", "image_ids", "image_grids"):
            assert torch.equal(getattr(x, name), getattr(y, name))
        assert (x.patches is None and y.patches is None) or torch.equal(x.patches, y.patches)
    assert [k for _, k in a] != [k for _, k in c]
