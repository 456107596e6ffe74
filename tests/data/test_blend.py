"""An Energon metadataset (MetadatasetV2) blend of caption, conversation and text sets."""

from __future__ import annotations

from collections import Counter

import pytest

from pretrain.data import LoaderConfig, NeoDataLoader


def source_of(key: str) -> str:
    return {"s21": "captions", "s22": "text"}.get(key.split("-")[2], "mixed")


def test_blend_mixes_sets_by_weight(blend_yaml, synthetic, tokenizer):
    cfg = LoaderConfig(
        path=str(blend_yaml),
        tokenizer=str(synthetic / "tokenizer"),
        seq_len=256,
        micro_batch_size=2,
        num_workers=0,
        packing_buffer_size=16,
        shuffle_buffer_size=16,
    )
    loader = NeoDataLoader(cfg, tokenizer=tokenizer)
    counts = Counter()
    batches = []
    for _ in range(25):
        batch = next(loader)
        batches.append(batch)
        counts.update(source_of(k) for row in loader.last.keys for k in row)
        assert batch.tokens.shape == (2, 256)
    total = sum(counts.values())
    assert total > 200
    for name, weight in (("captions", 0.25), ("text", 0.25), ("mixed", 0.5)):
        assert abs(counts[name] / total - weight) < 0.1, counts
    assert any(b.has_images for b in batches)
    # Deterministic: a second loader with the same seed gives the same stream.
    again = NeoDataLoader(cfg, tokenizer=tokenizer)
    for batch in batches[:3]:
        assert next(again).tokens.equal(batch.tokens)


def test_blend_needs_an_explicit_tokenizer(blend_yaml):
    cfg = LoaderConfig(path=str(blend_yaml), seq_len=256, micro_batch_size=1)
    with pytest.raises(ValueError, match="no tokenizer given"):
        NeoDataLoader(cfg)
