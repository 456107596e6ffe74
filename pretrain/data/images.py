"""Image bytes from a shard -> normalised 16x16 patches in the order NEO's patch embedding expects.

data_prep already resized every image to a multiple of 32 and recorded its size; the loader only
decodes, checks that the decoded size is the recorded one (a mismatch means the shard and its
JSON disagree: the token count would be wrong), normalises and patchifies.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from pretrain.model.vision_embed import normalize_image, patchify

PATCH = 16
MERGE = 2  # one LLM token per 2x2 patches (downsample ratio 0.5)
ALLOWED_FORMATS = ("JPEG", "PNG")


class ImageError(ValueError):
    """An image member that cannot be used (undecodable, wrong format or size)."""


def decode_image(data: bytes, size: tuple[int, int] | list[int]) -> Image.Image:
    """Decode one stored image and check it against the recorded ``size`` = [height, width]."""
    h, w = int(size[0]), int(size[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            # The header is read lazily: check the size before decoding any pixel.
            if image.size != (w, h):
                raise ImageError(f"decoded size {image.size[1]}x{image.size[0]} != recorded {h}x{w}")
            image.load()
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many exception types for broken data
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def image_patches(image: Image.Image, grid: tuple[int, int] | list[int]) -> torch.Tensor:
    """float32 [4 * gh * gw, 3 * 16 * 16]: ImageNet-normalised patches, row-major over the patch
    grid (which is 2x the token grid ``grid`` = (gh, gw)), as ``VisionEmbedding`` takes them."""
    gh, gw = int(grid[0]), int(grid[1])
    if image.size != (gw * PATCH * MERGE, gh * PATCH * MERGE):
        raise ImageError(f"image {image.size[1]}x{image.size[0]} does not match token grid {gh}x{gw}")
    return patchify(normalize_image(image), PATCH)
