"""Image decoding and normalisation on real encoded files of every awkward kind."""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep.images import ImageOptions, decode_rgb, process_image
from data_prep.rejects import Reject
from tests.data_prep.helpers import SMALL, encode, exif_rotated_jpeg, jpeg, noise_rgb

OPTS = ImageOptions(**SMALL)


def reject_code(data: bytes, options: ImageOptions = OPTS) -> str:
    with pytest.raises(Reject) as info:
        process_image(data, options)
    return info.value.code


def stored_pixels(data: bytes, options: ImageOptions = OPTS) -> tuple[np.ndarray, object]:
    out = process_image(data, options)
    img = Image.open(io.BytesIO(out.data))
    assert img.mode == "RGB" and img.format == ("JPEG" if options.image_format == "jpeg" else "PNG")
    assert [img.height, img.width] == list(out.size)
    return np.asarray(img), out


def test_plain_jpeg_keeps_size_and_records_grid():
    arr, out = stored_pixels(jpeg(96, 64))
    assert out.orig_size == (64, 96) and out.size == (64, 96)
    assert out.grid == (2, 3) and out.num_tokens == 6
    assert abs(int(arr[..., 0].mean()) - 200) <= 3


def test_resize_to_grid_multiple():
    out = process_image(encode(noise_rgb(100, 50), "PNG"), OPTS)
    assert out.orig_size == (50, 100)
    assert out.size == (64, 96)  # 50/32 = 1.56 -> 2, 100/32 = 3.1 -> 3; 6144 px is inside the budget


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    arr, _ = stored_pixels(encode(cmyk, "JPEG", quality=95))
    r, g, b = (int(arr[..., i].mean()) for i in range(3))
    assert r > 200 and g < 40 and b < 40


def test_png_alpha_is_composited_on_white():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 32, 64))  # left half: fully transparent blue
    arr, _ = stored_pixels(encode(img, "PNG"), ImageOptions(**SMALL, image_format="png"))
    assert (arr[:, :28] == 255).all()  # transparent -> white (not the hidden blue)
    assert (arr[:, 36:] == [255, 0, 0]).all()


def test_palette_with_transparency():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    img.paste(1, (0, 0, 64, 32))
    data = encode(img, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    arr, _ = stored_pixels(data, ImageOptions(**SMALL, image_format="png"))
    assert (arr[:28] == 255).all() and (arr[36:] == [0, 255, 0]).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.full((64, 64), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    values[:, 32:] = 65535
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr, _ = stored_pixels(data, ImageOptions(**SMALL, image_format="png"))
    assert (arr[:, :32] == 128).all() and (arr[:, 32:] == 255).all()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGBX", "YCbCr", "I"])
def test_other_modes_convert(mode):
    fmt = "TIFF" if mode in ("YCbCr", "RGBX", "I") else "PNG"
    img = Image.new(mode, (64, 32))
    data = encode(img, fmt)
    _, out = stored_pixels(data)
    assert out.size == (32, 64)


def test_exif_orientation_is_applied():
    arr, out = stored_pixels(exif_rotated_jpeg(96, 64, orientation=6))
    assert out.orig_size == (96, 64)  # upright: the stored landscape becomes portrait
    assert out.size == (96, 64)
    # Orientation 6 = rotate 90 degrees clockwise: the stored left half (red) ends up on top.
    assert arr[:40, :, 0].mean() > 200 and arr[:40, :, 2].mean() < 60
    assert arr[-40:, :, 2].mean() > 200


def test_truncated_jpeg():
    data = encode(noise_rgb(256, 256), "JPEG", quality=90)
    assert reject_code(data[: len(data) // 2]) == "corrupt_image"


def test_text_file_named_jpg():
    assert reject_code(b"this is a caption, not an image\n") == "corrupt_image"


def test_empty_file_and_zero_dimension_header():
    assert reject_code(b"") == "zero_size"
    png = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    png[16:20] = (0).to_bytes(4, "big")  # IHDR width = 0
    assert reject_code(bytes(png)) == "zero_size"


def test_extreme_aspect_ratio_is_rejected_before_decoding():
    data = encode(Image.new("RGB", (30000, 2)), "PNG")
    with pytest.raises(Reject) as info:
        decode_rgb(data)
    assert info.value.code == "aspect_ratio" and "15000" in info.value.message


def test_decompression_bomb_via_lowered_limit():
    data = encode(Image.new("RGB", (1000, 1000)), "PNG")
    assert reject_code(data, ImageOptions(**SMALL, max_image_pixels=500_000)) == "decompression_bomb"
    process_image(data, ImageOptions(**SMALL, max_image_pixels=1_000_000))  # at the limit: fine


def test_pil_hard_bomb_error_is_a_reject(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises itself above 2x this
    assert reject_code(encode(Image.new("RGB", (64, 64)), "PNG")) == "decompression_bomb"


def test_float_image_is_unsupported():
    assert reject_code(encode(Image.new("F", (32, 32), 0.5), "TIFF")) == "unsupported_image"


def test_disallowed_container_is_not_parsed():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert reject_code(eps) == "corrupt_image"


def test_encoding_is_deterministic_and_metadata_free():
    data = exif_rotated_jpeg()
    a, b = process_image(data, OPTS).data, process_image(data, OPTS).data
    assert a == b
    assert not Image.open(io.BytesIO(a)).getexif()


def test_reference_multi_image_budget():
    opts = ImageOptions(min_pixels=1024, max_pixels=65536, multi_image_budget="reference")
    assert (
        opts.max_pixels_for(1) == 65536
        and opts.max_pixels_for(4) == 32768
        and opts.max_pixels_for(200) == 1024
    )
    assert ImageOptions(min_pixels=1024, max_pixels=65536).max_pixels_for(4) == 65536
