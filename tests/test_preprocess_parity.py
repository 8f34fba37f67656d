"""The service's Pillow+NumPy preprocessing against training's torchvision transform.

Both sides must turn one image into the same tensor, or the served embeddings drift
from the ones the kNN monitor measured. The tolerance covers float rounding only.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from service.preprocess import preprocess_image
from tests.data_paths import require_cifar10
from training.augment import eval_preprocessing, eval_transform

TOLERANCE = 1e-5


def cifar_images(count: int) -> list[Image.Image]:
    shard = require_cifar10() / "test-00000-of-00001.tar.gz"
    images = []
    with tarfile.open(shard) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith("0007.jpg"):
                data = archive.extractfile(member)
                assert data is not None
                images.append(Image.open(data).copy())
            if len(images) == count:
                break
    return images


def synthetic_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = []
    for width, height in [
        (32, 32),
        (45, 37),
        (37, 45),
        (300, 17),
        (17, 300),
        (640, 480),
    ]:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    grey = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), mode="L")
    images.append(grey)
    images.append(images[3].convert("P"))
    rgba = np.dstack(
        [rng.integers(0, 256, (40, 40, 3)), rng.integers(0, 256, (40, 40))]
    )
    images.append(Image.fromarray(rgba.astype(np.uint8), mode="RGBA"))
    return images


def assert_same(image: Image.Image, image_size: int) -> None:
    preprocessing = eval_preprocessing(image_size)
    served = preprocess_image(image, preprocessing)
    with torch.no_grad():
        trained = eval_transform(preprocessing)(image).numpy()
    assert served.shape == trained.shape == (3, image_size, image_size)
    np.testing.assert_allclose(served, trained, atol=TOLERANCE)


@pytest.mark.parametrize("image_size", [32, 64, 224])
def test_parity_synthetic_images(image_size: int) -> None:
    for image in synthetic_images():
        assert_same(image, image_size)


@pytest.mark.parametrize("image_size", [32, 224])
def test_parity_cifar10_images(image_size: int) -> None:
    for image in cifar_images(10):
        assert_same(image, image_size)
