"""A checkpoint is loadable only with a complete, matching manifest; the newest broken one is
reported and the previous valid one is used."""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import checkpointer as ckpt


def _fake_checkpoint(root: Path, step: int, payload: bytes = b"x" * 1000) -> Path:
    d = root / ckpt.step_dir_name(step)
    (d / "model").mkdir(parents=True)
    (d / "model" / "__0_0.distcp").write_bytes(payload)
    (d / "trainer.json").write_text('{"step": %d}' % step)
    ckpt.write_manifest(d, step)
    return d


def test_complete_checkpoint_verifies(tmp_path):
    assert ckpt.verify(_fake_checkpoint(tmp_path, 10)) is None


def test_truncated_shard_is_detected_and_skipped(tmp_path):
    good = _fake_checkpoint(tmp_path, 10)
    bad = _fake_checkpoint(tmp_path, 20)
    shard = bad / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:500])  # truncated after the save
    assert "has 500 bytes, the manifest says 1000" in ckpt.verify(bad)
    seen = []
    assert ckpt.find_resumable(tmp_path, seen.append) == good
    assert "step_00000020" in seen[0] and "not usable" in seen[0]


def test_edited_shard_and_missing_manifest_are_detected(tmp_path):
    d = _fake_checkpoint(tmp_path, 5)
    shard = d / "model" / "__0_0.distcp"
    shard.write_bytes(b"y" * 1000)  # same size, other bytes
    assert "sha256" in ckpt.verify(d)
    (d / ckpt.MANIFEST).unlink()
    assert "no manifest" in ckpt.verify(d)


def test_temporary_directories_are_never_candidates(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    (tmp_path / "step_00000009.tmp" / "model").mkdir(parents=True)  # a save that died
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]


def test_prune_keeps_newest_and_protected(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, step)
    ckpt._prune(tmp_path, keep=2, protected={ckpt.step_dir_name(1)})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 4, 5]
