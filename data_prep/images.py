"""Image handling: decode safely, normalise to upright 8-bit RGB, smart-resize, re-encode.

Everything the loader needs to know about an image (original and stored size, token grid,
token count) is computed here once, so the trainer never re-derives it and cannot disagree.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep.rejects import Reject

# One LLM token covers 32x32 pixels (16-px patches, then a 2x2 dense embedding).
FACTOR = 32
MAX_ASPECT_RATIO = 200
# The spec's pixel budgets: pre-training, and mid-training / SFT.
PRETRAIN_MIN_PIXELS = 65_536
PRETRAIN_MAX_PIXELS = 4_194_304
SFT_MAX_PIXELS = 16_777_216
# Same default as PIL's own warning threshold; over it an image is treated as a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The byte limit on an image *file*, derived from the pixel limit (see max_image_file_bytes): no
# image we would accept can be bigger than its pixels stored uncompressed at the widest sample
# layout PIL decodes for us (16-bit RGBA: 8 bytes per pixel) plus room for metadata (EXIF, ICC,
# XMP, thumbnails). With the default pixel limit that is 732,605,096 bytes (about 699 MiB).
MAX_ENCODED_BYTES_PER_PIXEL = 8
ENCODED_METADATA_ALLOWANCE = 16 * 1024 * 1024
# Containers we agree to parse. An allow-list keeps PIL away from formats that shell out
# (EPS -> ghostscript) or are rarely well tested. "JPEG" also opens MPO (what many phone
# cameras write); the first picture is used.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
IMAGE_FORMATS = {"jpeg": "jpg", "png": "png"}  # --image-format -> file extension in the shard


def max_image_file_bytes(max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """Largest image file (encoded bytes) read from disk for a given decompression-bomb limit.

    Files over it are rejected (``image_too_large``) from their size alone, and never more than
    this many bytes (+1, to detect a file whose reported size lies) are read, so a huge or
    endless file cannot exhaust memory before the pixel limit is even checked.
    """
    return max_image_pixels * MAX_ENCODED_BYTES_PER_PIXEL + ENCODED_METADATA_ALLOWANCE


class AspectRatioError(ValueError):
    """The image is too elongated to be resized to a multiple-of-32 grid inside the budget."""


def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = PRETRAIN_MIN_PIXELS,
    max_pixels: int = PRETRAIN_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width) for an image, exactly as the Qwen2-VL / NEO reference computes it.

    Both sides become multiples of ``factor`` (at least one factor), the aspect ratio is kept
    as closely as possible and the pixel count is brought into [min_pixels, max_pixels]:
    round each side to the nearest multiple; if that overshoots max_pixels scale both sides by
    1/sqrt(ratio) and floor, if it undershoots min_pixels scale up and ceil. Python's round()
    (half to even) is part of the reference behaviour. At extreme aspect ratios with a tiny
    budget the one-factor minimum side can exceed max_pixels, as in the reference.
    Raises AspectRatioError when long side / short side > 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise AspectRatioError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored. Recorded verbatim in the manifest (they decide the bytes)."""

    min_pixels: int = PRETRAIN_MIN_PIXELS
    max_pixels: int = PRETRAIN_MAX_PIXELS
    factor: int = FACTOR
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    image_format: str = "jpeg"
    quality: int = 95
    # "spec": every image gets [min_pixels, max_pixels] (NEO_MODEL.md). "reference": a record
    # with n > 1 images gives each max(max_pixels * 2 // n, min_pixels), as the reference loader.
    multi_image_budget: str = "spec"

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.multi_image_budget not in ("spec", "reference"):
            raise ValueError(
                f"multi_image_budget must be 'spec' or 'reference', got {self.multi_image_budget!r}"
            )
        if self.max_image_pixels <= 0:
            raise ValueError("max_image_pixels must be positive")

    @property
    def extension(self) -> str:
        return IMAGE_FORMATS[self.image_format]

    def max_pixels_for(self, num_images: int) -> int:
        """Per-image pixel ceiling for a record holding ``num_images`` images."""
        if self.multi_image_budget == "reference" and num_images > 1:
            return max(self.max_pixels * 2 // num_images, self.min_pixels)
        return self.max_pixels


@dataclass(frozen=True)
class StoredImage:
    """One image as written to the shard plus the facts the loader reads from the JSON."""

    data: bytes
    orig_size: tuple[int, int]  # (h, w) upright, before resizing
    size: tuple[int, int]  # (h, w) stored
    factor: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.size[0] // self.factor, self.size[1] // self.factor

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF or BMP header, without PIL.

    PIL refuses zero-width/height images as "unidentified"; reading the header ourselves lets
    the report say zero_size instead of the vaguer corrupt_image.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(
            int.from_bytes(data[22:26], "little", signed=True)
        )
    return None


def _open(data: bytes, max_image_pixels: int) -> Image.Image:
    """Parse the header only; reject what is not an image or is too big before decoding pixels."""
    if len(data) == 0:
        raise Reject("zero_size", "the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise Reject("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        declared = _declared_size(data)
        if declared is not None and 0 in declared:
            raise Reject(
                "zero_size", f"the image header declares a zero dimension ({declared[0]}x{declared[1]})"
            ) from None
        raise Reject(
            "corrupt_image",
            f"not a recognised image (allowed: {', '.join(ALLOWED_FORMATS)})",  # no size: it says too much
        ) from None
    except Exception as exc:  # PIL raises many types on hostile headers
        raise Reject("corrupt_image", f"cannot parse image header: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise Reject("zero_size", f"image has a zero dimension ({width}x{height})")
    if width * height > max_image_pixels:
        raise Reject(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels is over the limit of {max_image_pixels}",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise Reject("aspect_ratio", f"{width}x{height} has aspect ratio {ratio:.1f} > {MAX_ASPECT_RATIO}")
    return img


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits (PIL's own convert would clip everything above 255 to white)."""
    arr = np.asarray(img)
    if img.mode == "I" and (arr.min() < 0 or arr.max() > 65535):
        raise Reject(
            "unsupported_image",
            f"32-bit integer image with values outside 0..65535 ({arr.min()}..{arr.max()})",
        )
    arr = arr.astype(np.uint32)
    grey = ((arr * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white.

    The reference evaluation loader pastes transparent images onto a "contrasting" colour, but
    its contrast test can never pick black, so it is always white; we do the same for every image
    that has any non-opaque pixel, so train and eval see the same pixels.
    """
    rgba = img.convert("RGBA")
    lo, _ = rgba.getchannel("A").getextrema()
    if lo == 255:
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any supported pixel mode -> 8-bit RGB, with no guessing about what values mean."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(img)
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    raise Reject("unsupported_image", f"pixel mode {mode!r} has no lossless meaning as RGB")


def decode_rgb(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode ``data`` to an upright RGB image, raising Reject for anything unusable."""
    img = _open(data, max_image_pixels)
    try:
        img.load()  # decodes every pixel: truncated or corrupt data fails here
    except Reject:
        raise
    except Exception as exc:
        raise Reject(
            "corrupt_image", f"cannot decode {img.format} data: {type(exc).__name__}: {exc}"
        ) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise Reject("corrupt_image", f"cannot apply EXIF orientation: {type(exc).__name__}: {exc}") from None
    return to_rgb(img)


def encode(img: Image.Image, image_format: str, quality: int) -> bytes:
    """Deterministic, metadata-free encoding (no EXIF, ICC or timestamps in the output)."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def process_image(data: bytes, options: ImageOptions, max_pixels: int | None = None) -> StoredImage:
    """Raw file bytes -> stored image: decode, RGB, smart-resize (bicubic), re-encode."""
    img = decode_rgb(data, options.max_image_pixels)
    width, height = img.size
    try:
        new_h, new_w = smart_resize(
            height,
            width,
            factor=options.factor,
            min_pixels=options.min_pixels,
            max_pixels=options.max_pixels if max_pixels is None else max_pixels,
        )
    except AspectRatioError as exc:  # already checked on the header; kept for EXIF edge cases
        raise Reject("aspect_ratio", str(exc)) from None
    if (new_h, new_w) != (height, width):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return StoredImage(
        data=encode(img, options.image_format, options.quality),
        orig_size=(height, width),
        size=(new_h, new_w),
        factor=options.factor,
    )
