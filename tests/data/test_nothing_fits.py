"""Samples longer than seq_len: counted as distinct samples however often the data comes round,
reported in one line (with the seq_len and the pixel budget that would fit them) and in the
loader's summary, never one line per sample; when nothing fits at all the loader stops with one
clear error instead of handing the trainer rows of padding (a 0/0 loss)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError
from pretrain.data import LoaderConfig, NeoDataLoader
from pretrain.data.loader import NothingFitsError, too_long_summary
from pretrain.data.task_encoder import NeoTaskEncoder
from tests.data.test_packing import sample_lengths

REPO = Path(__file__).resolve().parents[2]


def loader_for(path, tokenizer, seq_len: int, **kw) -> NeoDataLoader:
    cfg = LoaderConfig(path=str(path), seq_len=seq_len, micro_batch_size=2, num_workers=0, packing_buffer_size=16,
                       shuffle_buffer_size=8, max_samples_per_sequence=8, **kw)
    return NeoDataLoader(cfg, tokenizer=tokenizer)


def test_fit_pixels_is_the_per_image_budget_that_fits(tokenizer):
    enc = NeoTaskEncoder(tokenizer, seq_len=100)
    image = {"size": [256, 256], "grid": [8, 8], "num_tokens": 64}
    # 50 text tokens + <img> 64 x <IMG_CONTEXT> </img>: 48 image tokens would fit, 32 x 32 pixels each.
    assert enc.fit_pixels(50 + 66, [image]) == 48 * 1024
    assert enc.fit_pixels(2 * 66 + 20, [image, image]) == (100 - 20 - 4) // 2 * 1024
    assert enc.fit_pixels(120 + 66, [image]) == 0  # the text alone is too long
    assert enc.fit_pixels(120, []) is None


def test_summary_line_names_the_count_seq_len_and_pixel_budget():
    too_long = {"/d:a": (300, 4096), "/d:b": (500, 2048), "/d:c": (200, 0), "/d:t": (180, None)}
    line = too_long_summary(too_long, 128)
    assert line.startswith("4 samples cannot fit seq_len 128 (train.seq_len)"), line
    assert "180 to 500 tokens" in line and "e.g. a, b, c" in line
    assert "train.seq_len=500 fits them all" in line
    assert "--max-pixels 2048 fits the 2 with images" in line and "2 do not fit at any pixel budget" in line
    assert "\n" not in line


def test_nothing_fits_is_one_clear_error(synthetic, tokenizer, caplog):
    shortest = min(sample_lengths(synthetic, tokenizer).values())
    loader = loader_for(synthetic, tokenizer, seq_len=shortest - 1)
    with caplog.at_level(logging.DEBUG, logger="pretrain.data"), pytest.raises(NothingFitsError) as err:
        next(loader)
    loader.close()
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message
    assert message.startswith("no sample fits: ") and f"cannot fit seq_len {shortest - 1}" in message, message
    assert "fits them all" in message, message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "skipping sample" in r.getMessage()]


def test_too_long_samples_count_once_however_often_they_come_round(synthetic, tokenizer, caplog):
    seq_len = 40
    lengths = sample_lengths(synthetic, tokenizer)
    too_long = {k for k, n in lengths.items() if n > seq_len}
    assert too_long and len(too_long) < len(lengths) // 2
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader = loader_for(synthetic, tokenizer, seq_len)  # repeat=True: the data comes round again
        for _ in range(400):
            next(loader)
            if loader.totals.skipped_too_long > 2 * len(too_long):
                break
        state = loader.state_dict()
        loader.close()
    totals = loader.totals
    assert totals.skipped_too_long > 2 * len(too_long), "the data did not repeat within 400 batches"
    assert totals.too_long_samples == len(too_long)
    assert loader.stats()["skipped_samples"] == len(too_long)  # distinct, not repeats
    lines = [r.getMessage() for r in caplog.records if "cannot fit seq_len" in r.getMessage()]
    assert len(lines) == 1 and "skipped, never truncated" in lines[0], lines  # one line, when the first comes
    assert not [r for r in caplog.records if "skipping sample" in r.getMessage()]  # no line per sample
    summary = loader.summary()
    assert summary and f"{len(too_long)} samples cannot fit seq_len {seq_len}" in summary
    assert f"train.seq_len={max(lengths[k] for k in too_long)} fits them all" in summary
    assert "rebuilding the data with data_prep --max-pixels" in summary, summary  # they have images
    print(summary)
    # A resumed loader keeps counting distinct samples (the set travels with its state).
    again = loader_for(synthetic, tokenizer, seq_len)
    again.load_state_dict(state)
    assert again.stats()["skipped_samples"] == len(too_long) and again.summary() == summary
    again.close()


@pytest.mark.slow
def test_training_with_a_seq_len_nothing_fits_stops_with_one_line(synthetic, tokenizer, tmp_path):
    shortest = min(sample_lengths(synthetic, tokenizer).values())
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "model=tiny", "stage=stage2_midtrain", f"data.path={synthetic}",
         f"run_dir={run}", "train.steps=2", f"train.seq_len={shortest - 1}", "train.global_batch_size=4",
         "data.num_workers=0", "wandb.mode=disabled"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 2, log[-4000:]
    assert "Traceback" not in log and "skipping sample" not in log, log[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "no sample fits" in errors[0], log[-4000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
