"""The Pillow and NumPy evaluation transform, on hand-computed cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.bundle import Preprocessing
from service.preprocess import (
    MAX_ASPECT_RATIO,
    ImageError,
    center_crop_box,
    decode_image,
    make_thumbnail,
    preprocess_batch,
    preprocess_image,
    resized_size,
)
from tests.service.conftest import encode, random_image

SIMPLE = Preprocessing(
    resize_size=2, crop_size=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
)


def test_hand_computed_crop_and_normalise():
    # 4 wide, 2 high: the short side is already 2, so there is no resize, and the
    # crop keeps columns 1 and 2.
    red = np.array([[0, 51, 102, 153], [204, 255, 0, 51]], dtype=np.uint8)
    pixels = np.stack([red, np.full_like(red, 255), np.zeros_like(red)], axis=-1)
    out = preprocess_image(Image.fromarray(pixels, "RGB"), SIMPLE)

    expected_red = (np.array([[51, 102], [255, 0]]) / 255 - 0.5) / 0.25
    assert out.shape == (3, 2, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected_red, atol=1e-6)
    np.testing.assert_allclose(out[1], 2.0, atol=1e-6)
    np.testing.assert_allclose(out[2], -2.0, atol=1e-6)


def test_uniform_image_after_resize():
    p = Preprocessing(
        resize_size=8, crop_size=6, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4)
    )
    image = Image.new("RGB", (37, 23), (10, 128, 250))
    out = preprocess_image(image, p)
    expected = [
        (10 / 255 - 0.4) / 0.2,
        (128 / 255 - 0.5) / 0.3,
        (250 / 255 - 0.6) / 0.4,
    ]
    assert out.shape == (3, 6, 6)
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(out[channel], value, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((3, 6), (2, 4)),
        ((6, 3), (4, 2)),
        ((5, 7), (2, 2)),  # 2 * 7 / 5 = 2.8 truncates to 2
        ((7, 5), (2, 2)),
        ((2, 2), (2, 2)),
    ],
)
def test_resized_size_truncates(size, expected):
    assert resized_size(*size, resize_size=2) == expected


def test_resized_size_long_side():
    assert resized_size(100, 333, 32) == (32, 106)  # 106.56 truncates to 106
    assert resized_size(333, 100, 32) == (106, 32)


def test_center_crop_rounds_like_python():
    # Python's round sends halves to the even neighbour: 1.5 -> 2, 2.5 -> 2.
    assert center_crop_box(5, 5, 2) == (2, 2, 4, 4)
    assert center_crop_box(6, 6, 1) == (2, 2, 3, 3)
    assert center_crop_box(4, 3, 2) == (1, 0, 3, 2)


def test_resize_matches_pil_resize():
    p = Preprocessing(resize_size=16, crop_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    image = random_image(3, size=(48, 32))
    out = preprocess_image(image, p)
    resized = image.resize((24, 16), Image.Resampling.BILINEAR).crop((4, 0, 20, 16))
    expected = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("RGBA", (40, 32)),
        ("L", (32, 40)),
        ("P", (50, 32)),
        ("RGB", (32, 200)),
        ("RGB", (200, 32)),
        ("CMYK", (33, 33)),
        ("I;16", (35, 32)),
    ],
)
def test_modes_and_shapes(mode: str, size: tuple[int, int]):
    p = Preprocessing(
        resize_size=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    if mode == "I;16":
        source = Image.fromarray(
            np.arange(size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0]) * 50
        )
    else:
        source = random_image(1, size=size).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = decode_image(encode(source, fmt), max_pixels=10**6)
    assert decoded.mode == "RGB"
    out = preprocess_batch([decoded], p)
    assert out.shape == (1, 3, 32, 32)
    assert np.all(np.isfinite(out))
    assert out.min() >= -1.0 - 1e-6
    assert out.max() <= 1.0 + 1e-6


def test_alpha_composited_over_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    decoded = decode_image(encode(transparent), max_pixels=100)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_composited_over_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.info["transparency"] = 0
    decoded = decode_image(encode(image), max_pixels=100)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), max_pixels=10**6)
    assert decoded.size == (20, 40)


def test_undecodable_bytes():
    with pytest.raises(ImageError, match="could not be decoded") as info:
        decode_image(b"this is not an image", max_pixels=10**6, name="photo")
    assert "photo" in str(info.value)
    assert not info.value.too_large


def test_truncated_png():
    data = encode(random_image(0, size=(64, 64)))
    with pytest.raises(ImageError, match="could not be decoded"):
        decode_image(data[: len(data) // 2], max_pixels=10**6)


def test_empty_bytes():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", max_pixels=10**6)


def test_too_many_pixels():
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="10000 pixels") as info:
        decode_image(data, max_pixels=9999)
    assert info.value.too_large


def test_thumbnail_is_small_jpeg():
    data = make_thumbnail(random_image(0, size=(300, 200)), max_side=96)
    thumbnail = Image.open(io.BytesIO(data))
    assert thumbnail.format == "JPEG"
    assert thumbnail.size == (96, 64)


def test_elongated_image_rejected_before_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (MAX_ASPECT_RATIO * 10 + 10, 10)).save(buffer, format="PNG")
    with pytest.raises(ImageError) as raised:
        decode_image(buffer.getvalue(), max_pixels=40_000_000)
    assert raised.value.too_large
    assert f"{MAX_ASPECT_RATIO}:1" in str(raised.value)


def test_elongated_image_within_limit_preprocessed():
    image = Image.new("RGB", (MAX_ASPECT_RATIO * 4, 4), (10, 20, 30))
    assert preprocess_image(image, SIMPLE).shape == (3, 2, 2)

    too_long = Image.new("RGB", (MAX_ASPECT_RATIO * 4 + 4, 4))
    with pytest.raises(ImageError):
        preprocess_image(too_long, SIMPLE)
