"""Image decoding and the evaluation transform, in Pillow and NumPy.

The transform reproduces torchvision's evaluation pipeline on PIL images:
``Resize(resize_size)`` (shorter side, antialiased), ``CenterCrop(crop_size)``,
``ToTensor()`` and ``Normalize(mean, std)``. torchvision 0.29 computes the longer
side as ``int(resize_size * long / short)``, skips resizing when the size already
matches, and rounds the crop offsets with Python's ``round``. This module does the
same, so the arrays match torchvision's to float32 rounding.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.bundle import Preprocessing

logger = logging.getLogger(__name__)

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Alpha is composited over white, which is how viewers usually show it.
_BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An uploaded image cannot be decoded or breaks a size limit.

    ``too_large`` is True when the image broke a size limit, so that the HTTP
    layer returns 413 in place of 400.
    """

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def set_pixel_limit(max_pixels: int) -> None:
    """Set PIL's decompression-bomb limit for this process.

    PIL warns above the limit and raises above twice the limit. ``decode_image``
    checks the size itself, so this limit is a second guard for other code.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode image bytes into an RGB PIL image, upright per its EXIF orientation.

    Palette images with transparency and images with alpha are composited over
    white; greyscale, CMYK and other modes are converted to RGB.

    Raises:
        ImageError: the bytes are empty or not a supported image, or the image
            has more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageError(f"{name} is empty; upload a JPEG, PNG or other image file")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name} is {width}x{height} = {width * height} pixels, more "
                    f"than the limit of {max_pixels}; downscale it before upload",
                    too_large=True,
                )
            check_aspect_ratio(width, height)
            image.load()
            upright: Image.Image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{name} has more pixels than Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS}; downscale it before upload",
            too_large=True,
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow raises OSError for truncated files and SyntaxError or
        # ValueError for some malformed headers.
        raise ImageError(
            f"{name} could not be decoded as an image ({type(exc).__name__}); "
            "upload a valid JPEG, PNG, WebP, GIF, BMP or TIFF file"
        ) from exc

    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency over white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(array.max(), 1.0)
        scaled = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


# Resizing the shorter side keeps the aspect ratio, so a 1 x 1,000,000 image would
# become 32 x 32,000,000 pixels before the crop. Longer ratios are rejected.
MAX_ASPECT_RATIO = 64


def check_aspect_ratio(width: int, height: int) -> None:
    """Raise ImageError for an image too elongated to resize before cropping."""
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1, "
            f"over the limit of {MAX_ASPECT_RATIO}:1; crop it to a less elongated "
            "shape",
            too_large=True,
        )


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """Return (width, height) after resizing the shorter side to ``resize_size``.

    The longer side is truncated, as in torchvision's ``Resize``.
    """
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def center_crop_box(
    width: int, height: int, crop_size: int
) -> tuple[int, int, int, int]:
    """Return the (left, top, right, bottom) box of a centered square crop."""
    top = int(round((height - crop_size) / 2.0))
    left = int(round((width - crop_size) / 2.0))
    return left, top, left + crop_size, top + crop_size


def preprocess_image(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Apply the evaluation transform to an RGB image.

    Returns:
        float32 array of shape [3, crop_size, crop_size], normalised.
    """
    check_aspect_ratio(image.width, image.height)
    if image.mode != "RGB":
        image = to_rgb(image)

    new_size = resized_size(image.width, image.height, preprocessing.resize_size)
    if new_size != image.size:
        image = image.resize(new_size, _RESAMPLING[preprocessing.interpolation])
    image = image.crop(center_crop_box(*image.size, preprocessing.crop_size))

    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    normalised = (pixels - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def preprocess_batch(
    images: Sequence[Image.Image], preprocessing: Preprocessing
) -> np.ndarray:
    """Apply the evaluation transform to each image and stack the results.

    Returns:
        float32 array of shape [N, 3, crop_size, crop_size].
    """
    size = preprocessing.crop_size
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess_image(image, preprocessing)
    return batch


def make_thumbnail(image: Image.Image, max_side: int, quality: int = 85) -> bytes:
    """Encode a JPEG copy of ``image`` whose longer side is at most ``max_side``."""
    thumbnail = image.copy()
    thumbnail.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    thumbnail.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
