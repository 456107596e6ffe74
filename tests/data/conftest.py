"""Shared fixtures: small real data sets built by data_prep (shards, Energon metadata, tokenizer)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from data_prep.cli import main as data_prep_main

SYNTHETIC_NUM = 60
SYNTHETIC_SEED = 7


def build_synthetic(output: Path, num: int, seed: int, mix: str | None = None) -> Path:
    argv = ["synthetic", "--output", str(output), "--num", str(num), "--seed", str(seed), "--no-progress",
            "--workers", "1"]
    if mix:
        argv += ["--mix", mix]
    assert data_prep_main(argv) == 0
    return output


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The default-mix synthetic set (captions, conversations incl. two-image ones, text)."""
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", SYNTHETIC_NUM, SYNTHETIC_SEED)


@pytest.fixture(scope="session")
def tokenizer(synthetic):
    from pretrain.data.template import load_tokenizer

    return load_tokenizer(synthetic / "tokenizer")


@pytest.fixture
def synthetic_copy(synthetic, tmp_path) -> Path:
    """A private copy of the synthetic set that a test may damage."""
    target = tmp_path / "copy"
    shutil.copytree(synthetic, target)
    return target


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()
