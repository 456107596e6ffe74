"""smart_resize: the reference (Qwen2-VL / NEO) arithmetic, exactly."""

import math
import random
from pathlib import Path

import pytest

from data_prep.images import AspectRatioError, smart_resize

PRE = dict(min_pixels=65_536, max_pixels=4_194_304)


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((512, 512), (512, 512)),  # already on the grid, inside the budget: unchanged
        ((500, 333), (512, 320)),  # round each side to the nearest multiple of 32
        ((336, 335), (320, 320)),  # 335/32 = 10.47 -> 10; 336/32 = 10.5 -> 10 (half to even)
        ((240, 240), (256, 256)),  # 7.5 -> 8 (half to even)
        ((100, 100), (256, 256)),  # under min_pixels: scale up by sqrt(65536/10000) and ceil
        ((4000, 3000), (2336, 1760)),  # over max_pixels: scale down and floor
        ((10, 2000), (32, 3648)),  # short side held at one factor, then the min_pixels scale-up
    ],
)
def test_known_values(hw, expected):
    assert smart_resize(*hw, **PRE) == expected


def _independent(height, width, factor, min_pixels, max_pixels):
    """A second, literal transcription of the reference, used as the oracle."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _hf_smart_resize():
    """HF transformers' Qwen2-VL smart_resize, taken from its source file (importing the module
    needs torchvision, which this project does not install)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    path = Path(spec.origin).parent / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py"
    if not path.is_file():
        pytest.skip("transformers' Qwen2-VL image processor source not found")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    namespace = {"math": math}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["smart_resize"]


def test_matches_transformers_qwen2_vl_where_they_agree():
    """HF's Qwen2-VL smart_resize differs only for sides under 17 px (no one-factor minimum)."""
    hf_smart_resize = _hf_smart_resize()

    rng = random.Random(0)
    for _ in range(3000):
        h, w = rng.randint(17, 6000), rng.randint(17, 6000)
        if max(h, w) / min(h, w) > 200:
            continue
        for budget in (
            PRE,
            dict(min_pixels=65_536, max_pixels=16_777_216),
            dict(min_pixels=4096, max_pixels=65_536),
        ):
            assert smart_resize(h, w, 32, **budget) == hf_smart_resize(h, w, 32, **budget), (h, w, budget)


def test_invariants_and_oracle():
    rng = random.Random(1)
    for _ in range(5000):
        h, w = rng.randint(1, 9000), rng.randint(1, 9000)
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(AspectRatioError):
                smart_resize(h, w, **PRE)
            continue
        nh, nw = smart_resize(h, w, **PRE)
        assert (nh, nw) == _independent(h, w, 32, **PRE)
        assert nh % 32 == 0 and nw % 32 == 0 and nh >= 32 and nw >= 32
        assert nh * nw >= PRE["min_pixels"]
        assert nh * nw <= PRE["max_pixels"]  # holds for the pre-training budget at ratio <= 200


def test_aspect_ratio_limit_is_inclusive_at_200():
    assert smart_resize(64, 12800, **PRE)  # exactly 200 is allowed
    with pytest.raises(AspectRatioError, match="aspect ratio"):
        smart_resize(2, 30000, **PRE)


def test_rejects_non_positive_sizes():
    with pytest.raises(ValueError):
        smart_resize(0, 10)
