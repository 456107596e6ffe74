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
    argv = [
        "synthetic",
        "--output",
        str(output),
        "--num",
        str(num),
        "--seed",
        str(seed),
        "--no-progress",
        "--workers",
        "1",
    ]
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


BLEND = """\
__module__: megatron.energon
__class__: MetadatasetV2
splits:
  train:
    blend:
      - weight: 1
        path: captions
      - weight: 1
        path: text
      - weight: 2
        path: {mixed}
"""


@pytest.fixture(scope="session")
def blend_yaml(synthetic, tmp_path_factory) -> Path:
    """A MetadatasetV2 blend: captions-only and text-only sets (weight 1 each) and the mixed
    synthetic set (weight 2); keys tell them apart (seeds 21, 22 and SYNTHETIC_SEED)."""
    root = tmp_path_factory.mktemp("blend")
    build_synthetic(root / "captions", 24, seed=21, mix="caption=1")
    build_synthetic(root / "text", 24, seed=22, mix="text=1")
    path = root / "blend.yaml"
    path.write_text(BLEND.format(mixed=synthetic))
    return path


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
