"""Loader batches are what the model consumes: positions, mask, weights and the patch embedding
accept them and agree with the spec's formula on token ids."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.data import LoaderConfig, NeoDataLoader, TrainLoader
from pretrain.data.__main__ import main as data_cli
from pretrain.data.task_encoder import MicroBatch
from pretrain.model.loss import token_weights
from pretrain.model.positions import native_mask, native_positions
from pretrain.model.vision_embed import VisionEmbedding


def test_loader_batch_feeds_the_model_side(synthetic, tokenizer):
    cfg = LoaderConfig(
        path=str(synthetic),
        seq_len=192,
        micro_batch_size=3,
        num_workers=0,
        packing_buffer_size=24,
        shuffle_buffer_size=8,
    )
    batch = next(NeoDataLoader(cfg, tokenizer=tokenizer))
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    start = tokenizer.convert_tokens_to_ids("<img>")
    assert batch.has_images
    cells = batch.image_grids.prod(dim=1)
    assert int((batch.tokens == ctx).sum()) == int(cells.sum()) == int((batch.image_ids >= 0).sum())
    assert batch.patches.shape == (4 * int(cells.sum()), 768)
    # Image ids index the batch's image list, in order, and each image's tokens are contiguous.
    ids = batch.image_ids[batch.image_ids >= 0]
    assert torch.equal(torch.unique_consecutive(ids), torch.arange(len(cells)))
    assert torch.equal(torch.bincount(ids, minlength=len(cells)), cells)
    # T positions from the layout equal the reference formula on token ids, per document.
    t = native_positions(batch.doc_ids, batch.image_ids, batch.image_grids)[0]
    for r in range(batch.tokens.shape[0]):
        for d in batch.doc_ids[r].unique().tolist():
            sel = batch.doc_ids[r] == d
            tok = batch.tokens[r][sel]
            shifted = torch.cat([torch.zeros(1, dtype=torch.long), (tok == start).long()])[:-1]
            assert torch.equal(t[r][sel], (shifted + (tok != ctx).long()).cumsum(0) - 1)
    assert native_mask(batch.doc_ids, batch.image_ids).shape == (3, 1, 192, 192)
    w = token_weights(batch.loss_mask, batch.doc_ids)
    assert (w > 0).sum() == batch.loss_mask.sum()
    emb = VisionEmbedding(llm_hidden=8)
    assert emb(batch.patches, batch.image_grids).shape == (int(cells.sum()), 8)


@pytest.mark.filterwarnings("ignore:.*pin_memory")
def test_pin_memory_pins_only_the_batch_tensors(synthetic, tokenizer, monkeypatch):
    cfg = LoaderConfig(
        path=str(synthetic),
        seq_len=128,
        micro_batch_size=2,
        num_workers=0,
        packing_buffer_size=16,
        shuffle_buffer_size=0,
    )
    loader = NeoDataLoader(cfg, tokenizer=tokenizer)
    it = iter(loader._loader)
    micro: MicroBatch = next(it)
    pinned_ids = []
    monkeypatch.setattr(
        torch.Tensor, "pin_memory", lambda self, *a, **k: pinned_ids.append(id(self)) or self.clone()
    )
    out = micro.pin_memory()
    assert isinstance(out, MicroBatch) and out.keys == micro.keys
    assert len(pinned_ids) == 6 + (micro.batch.patches is not None)
    assert torch.equal(out.batch.tokens, micro.batch.tokens) and out.batch.tokens is not micro.batch.tokens


def test_cli_show_and_bench(synthetic, capsys):
    assert (
        data_cli(["show", str(synthetic), "--seq-len", "128", "--rows", "1", "--packing-buffer", "16"]) == 0
    )
    out = capsys.readouterr().out
    assert "--- row 0:" in out and "supervised targets" in out
    assert (
        data_cli(["bench", str(synthetic), "--seq-len", "128", "--batches", "3", "--packing-buffer", "16"])
        == 0
    )
    assert "samples/s" in capsys.readouterr().out


def test_train_loader_takes_the_trainer_arguments(synthetic):
    """The keyword arguments pretrain/trainer.py passes (cfg.data.*, cfg.train.*, DP rank/size)."""
    loader = TrainLoader(
        path=str(synthetic),
        tokenizer_path=str(synthetic / "tokenizer"),
        seq_len=128,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        num_workers=0,
        seed=5,
        packing_buffer=16,
        shuffle_buffer=8,
    )
    batch = next(iter(loader))
    assert batch.tokens.shape == (2, 128)
    stats = loader.stats()
    assert stats["rows"] == 2 and stats["skipped_samples"] == 0 and 0 < stats["pack_fill"] <= 1
    assert json.loads(json.dumps(loader.state_dict()))["layout"]["seq_len"] == 128
