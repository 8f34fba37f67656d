"""SimCLR augmentations and the evaluation transform, on PIL images.

The evaluation transform is part of the model bundle's contract: the service
reimplements it with Pillow and NumPy, so it stays the standard chain (resize the
shorter side with PIL's bilinear filter, center-crop, scale to [0, 1], normalise).
Transforms take PIL images, so torchvision hands resizing to PIL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from service.bundle import Preprocessing
from service.preprocess import to_rgb

logger = logging.getLogger(__name__)

# Mean and std per channel of the training images of common data sets, in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images up to this side use the small-image augmentations (no blur, crop scale
# down to 0.2); larger ones use the ImageNet recipe.
SMALL_IMAGE_MAX = 64


def _to_normalised_tensor(
    mean: Sequence[float], std: Sequence[float]
) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def simclr_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_min_scale: float | None = None,
    horizontal_flip: bool = True,
) -> v2.Compose:
    """Build the SimCLR augmentation for one view.

    Small images (``image_size`` <= 64 px): random resized crop with scale
    (0.2, 1), horizontal flip, color jitter (0.4, 0.4, 0.4, 0.1) with p=0.8,
    grayscale with p=0.2, and no blur. Larger images: crop scale (0.08, 1), the
    same flip, jitter and grayscale, and a Gaussian blur with p=0.5 whose kernel is
    about a tenth of the image side. ``crop_min_scale`` replaces the lower crop
    scale, and ``horizontal_flip=False`` drops the flip, for images such as digits
    whose identity a small crop or a mirror image changes.
    """
    if image_size <= 0:
        raise ValueError(
            f"image_size must be a positive number of pixels, got {image_size}"
        )
    small = image_size <= SMALL_IMAGE_MAX
    if crop_min_scale is None:
        crop_min_scale = 0.2 if small else 0.08
    if not 0.0 < crop_min_scale <= 1.0:
        raise ValueError(
            f"crop_min_scale must be in (0, 1], got {crop_min_scale}; it is the "
            "smallest fraction of the image area that a crop keeps"
        )
    steps: list[v2.Transform] = [
        v2.Lambda(to_rgb),
        v2.RandomResizedCrop(
            image_size,
            scale=(crop_min_scale, 1.0),
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(p=0.5 if horizontal_flip else 0.0),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if not small:
        kernel = (image_size // 10) | 1  # odd, as GaussianBlur requires
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


def eval_preprocessing(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Preprocessing:
    """Return the evaluation preprocessing for a crop of ``image_size`` pixels.

    Small images (<= 64 px) are resized to the crop size, so the crop keeps the
    whole image; larger ones are resized to ``image_size / 0.875`` and
    center-cropped, the ImageNet convention (256 then 224).
    """
    if image_size <= 0:
        raise ValueError(
            f"image_size must be a positive number of pixels, got {image_size}"
        )
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"mean {tuple(mean)} and std {tuple(std)} need one value per RGB channel"
        )
    if image_size <= SMALL_IMAGE_MAX:
        resize_size = image_size
    else:
        resize_size = round(image_size / 0.875)
    return Preprocessing(
        resize_size=resize_size,
        crop_size=image_size,
        interpolation="bilinear",
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
    )


def eval_transform(preprocessing: Preprocessing) -> v2.Compose:
    """Build the evaluation transform that a bundle's ``preprocessing`` describes.

    Input: a PIL image of any mode and size. Output: float32 [3, crop, crop].
    """
    interpolation = {
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
    }[preprocessing.interpolation]
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            v2.Resize(
                preprocessing.resize_size, interpolation=interpolation, antialias=True
            ),
            v2.CenterCrop(preprocessing.crop_size),
            *_to_normalised_tensor(preprocessing.mean, preprocessing.std),
        ]
    )


class TwoViews:
    """Apply a random transform twice to the same image and return both views."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> tuple[Any, Any]:
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"
