"""Patchify, normalisation and the patch embedding against a direct path written from the spec
(spec/NEO_MODEL.md, "Pixels to tokens"): whole-image convolutions, 2D RoPE with explicit loops
on the feature map, one image at a time.

Tolerance 1e-5 (fp32): the module computes Conv16 and the 2x2 conv as matmuls over gathered
patches, the direct path with F.conv2d; both sum the same <= 768 products of O(1) terms in a
different order (~1e-6 apart), and the RoPE angles (patch coordinates < 12) differ from the
float64 loop by < 12 * 2^-22 rad.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.model.vision_embed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VisionEmbedding,
    normalize_image,
    patchify,
)

ATOL = 1e-5  # see module docstring
TOKEN_GRIDS = [(1, 1), (1, 3), (3, 1), (2, 2), (2, 3)]  # incl. 1xN and Nx1


def test_patchify_is_row_major_and_flattens_c_y_x():
    pixels = torch.arange(3 * 48 * 80, dtype=torch.float32).reshape(3, 48, 80)
    patches = patchify(pixels)
    assert patches.shape == (3 * 5, 3 * 16 * 16)
    for row in range(3):
        for col in range(5):
            block = pixels[:, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16]  # (c, y, x)
            assert torch.equal(patches[row * 5 + col], block.reshape(-1))
    with pytest.raises(ValueError):
        patchify(torch.zeros(3, 40, 32))


def test_normalize_image():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    got = normalize_image(array)
    assert got.shape == (3, 32, 64) and got.dtype == torch.float32
    for c in range(3):
        expected = (array[:, :, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(got[c].numpy(), expected, atol=1e-6)  # fp32 of values < 3
    assert torch.equal(normalize_image(Image.fromarray(array)), got)
    assert torch.equal(normalize_image(Image.fromarray(array).convert("RGBA")), got)
    with pytest.raises(ValueError):
        normalize_image(array[:, :, 0])


def brute_rope_feature_map(features, base):
    """[C, rows, cols] map: channels [:C/2] rotated by the column x, [C/2:] by the row y, pairs
    (2i, 2i+1) within a half, frequency base^(-2i/(C/2))."""
    c, rows, cols = features.shape
    half = c // 2
    out = features.double().clone()
    for y in range(rows):
        for x in range(cols):
            for start, position in ((0, x), (half, y)):
                for i in range(half // 2):
                    a, b = float(features[start + 2 * i, y, x]), float(features[start + 2 * i + 1, y, x])
                    angle = position * base ** (-2 * i / half)
                    out[start + 2 * i, y, x] = a * math.cos(angle) - b * math.sin(angle)
                    out[start + 2 * i + 1, y, x] = b * math.cos(angle) + a * math.sin(angle)
    return out.float()


@torch.no_grad()
def direct_path(module, image):
    """One image [3, H, W] -> [gh*gw, llm_hidden] with whole-image convolutions."""
    pe, de = module.patch_embedding, module.dense_embedding
    features = F.gelu(F.conv2d(image[None], pe.weight, pe.bias, stride=16))[0]  # [C, H/16, W/16]
    features = brute_rope_feature_map(features, module.rope_theta_vision)
    tokens = F.conv2d(features[None], de.weight, de.bias, stride=2)[0]  # [llm, gh, gw]
    return tokens.permute(1, 2, 0).reshape(-1, tokens.shape[0])  # row-major over the token grid


def test_matches_direct_path_for_many_images():
    torch.manual_seed(0)
    module = VisionEmbedding(llm_hidden=12, vision_hidden=16)
    images = [torch.randn(3, 32 * gh, 32 * gw) for gh, gw in TOKEN_GRIDS]
    patches = torch.cat([patchify(image) for image in images])
    with torch.no_grad():
        got = module(patches, torch.tensor(TOKEN_GRIDS))
    expected = torch.cat([direct_path(module, image) for image in images])
    assert got.shape == (sum(gh * gw for gh, gw in TOKEN_GRIDS), 12)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


def test_reference_weight_names_and_shapes():
    module = VisionEmbedding(llm_hidden=64)
    shapes = {name: tuple(p.shape) for name, p in module.state_dict().items()}
    assert shapes == {
        "patch_embedding.weight": (1024, 3, 16, 16),
        "patch_embedding.bias": (1024,),
        "dense_embedding.weight": (64, 1024, 2, 2),
        "dense_embedding.bias": (64,),
    }
    module.reset_parameters(std=0.02)
    assert module.dense_embedding.bias.eq(0).all()
    assert abs(module.patch_embedding.weight.std().item() - 0.02) < 1e-3


def test_bf16_and_backward():
    torch.manual_seed(1)
    module = VisionEmbedding(llm_hidden=8, vision_hidden=16)
    patches = torch.cat([patchify(torch.randn(3, 32 * gh, 32 * gw)) for gh, gw in TOKEN_GRIDS[:3]])
    grids = torch.tensor(TOKEN_GRIDS[:3])
    module(patches, grids).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert module.to(torch.bfloat16)(patches, grids).dtype == torch.bfloat16
