import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_paths import require_cifar10
from tests.training.files import write_image_folder, write_python_batches
from training.augment import eval_preprocessing, eval_transform
from training.data import (
    CIFAR10Batches,
    TarShards,
    build_datasets,
    dataset_name,
    detect_source,
    load_digits_images,
    load_sample_images,
)


def test_digits_split_sizes():
    splits = build_datasets("digits", image_size=32)

    assert len(splits.train) + len(splits.test) == 1797
    assert len(splits.memory) == len(splits.train)
    assert len(splits.test) == 360
    assert splits.classes == tuple(str(d) for d in range(10))
    assert splits.name == "sklearn-digits"


def test_digits_images_are_32px_rgb():
    arrays = load_digits_images()
    images, labels = arrays["train"]

    assert images.shape == (1437, 32, 32, 3)
    assert images.dtype == np.uint8
    assert images.max() == 255
    assert set(labels.tolist()) == set(range(10))


def test_digits_split_is_deterministic():
    first = load_digits_images(seed=0)["test"][1]
    second = load_digits_images(seed=0)["test"][1]
    other = load_digits_images(seed=1)["test"][1]

    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_digits_items_are_views_and_eval_tensors():
    splits = build_datasets("digits", image_size=32)

    (view1, view2), label = splits.train[0]
    image, test_label = splits.test[0]

    assert view1.shape == (3, 32, 32)
    assert view2.shape == (3, 32, 32)
    assert not torch.equal(view1, view2)
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert 0 <= label < 10
    assert 0 <= test_label < 10


def test_python_batches_read_channel_planes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_python_batches(folder)

    test = CIFAR10Batches(folder, "test")
    raw = batches["test_batch"][b"data"][1]

    assert test.images.shape == (4, 32, 32, 3)
    # The row contains the red plane, then green, then blue, each row-major 32x32.
    row, col = 5, 7
    expected = [raw[c * 1024 + row * 32 + col] for c in range(3)]
    assert test.images[1, row, col].tolist() == expected
    assert test.labels.tolist() == batches["test_batch"][b"labels"]


def test_python_batches_source(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder)

    splits = build_datasets(tmp_path)  # the parent folder is accepted too

    assert detect_source(folder) == "cifar10-batches"
    assert len(splits.train) == 20
    assert len(splits.test) == 4
    assert splits.name == "cifar10"
    assert splits.preprocessing.crop_size == 32
    assert splits.test[0][0].shape == (3, 32, 32)


def test_image_folder_with_train_and_test(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    write_image_folder(tmp_path / "test", per_class=2)

    splits = build_datasets(tmp_path, image_size=16)
    (view1, _), _ = splits.train[0]
    image, _ = splits.test[0]

    assert detect_source(tmp_path) == "imagefolder"
    assert len(splits.train) == 12
    assert len(splits.test) == 4
    assert splits.classes == ("cat", "dog")
    assert view1.shape == (3, 16, 16)
    assert image.shape == (3, 16, 16)
    assert splits.name == f"imagefolder:{tmp_path.name}"


def test_image_folder_single_root_is_split(tmp_path):
    write_image_folder(tmp_path, per_class=10)

    first = build_datasets(tmp_path, image_size=16, seed=3)
    second = build_datasets(tmp_path, image_size=16, seed=3)

    assert len(first.train) == 16
    assert len(first.test) == 4
    assert list(first.test.indices) == list(second.test.indices)
    assert set(first.train.indices).isdisjoint(first.test.indices)
    test_labels = Counter(first.test[i][1] for i in range(len(first.test)))
    assert test_labels == {0: 2, 1: 2}


def test_image_folder_classes_must_match(tmp_path):
    write_image_folder(tmp_path / "train", classes=("cat", "dog"), per_class=2)
    write_image_folder(tmp_path / "test", classes=("cat", "fox"), per_class=2)

    with pytest.raises(ValueError, match="different class folders"):
        build_datasets(tmp_path)


def test_missing_path_raises_with_name(tmp_path):
    missing = tmp_path / "no-such-data"

    with pytest.raises(ValueError, match="no-such-data"):
        build_datasets(missing)


def test_unknown_layout_raises_with_name(tmp_path):
    (tmp_path / "notes.txt").write_text("not images")

    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path)) + ".*accepted layout"
    ):
        build_datasets(tmp_path)


def test_shards_first_images():
    root = require_cifar10()

    shards = TarShards(root, "test", max_images=50)
    image, label = shards[0]

    assert len(shards) == 50
    assert image.size == (32, 32)
    assert image.mode == "RGB"
    assert len(shards.classes) == 10
    assert shards.classes[0] == "airplane"
    assert shards.labels.min() >= 0
    assert shards.labels.max() < 10


def test_shards_test_split_counts():
    root = require_cifar10()

    test = TarShards(root, "test")

    assert detect_source(root) == "tar-shards"
    assert dataset_name(root) == "cifar10-jpeg"
    assert len(test) == 10000
    assert Counter(test.labels.tolist()) == {label: 1000 for label in range(10)}


def test_sample_images_from_shards():
    root = require_cifar10()

    samples = load_sample_images(root, count=3)

    assert len(samples) == 3
    assert all(image.size == (32, 32) for image in samples)
    assert all(image.mode == "RGB" for image in samples)


def test_eval_preprocessing_sizes():
    small = eval_preprocessing(32)
    large = eval_preprocessing(224)

    assert (small.resize_size, small.crop_size) == (32, 32)
    assert (large.resize_size, large.crop_size) == (256, 224)


def test_eval_transform_resizes_shorter_side_and_normalises():
    preprocessing = eval_preprocessing(224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    image = Image.new("RGB", (400, 300), (255, 128, 0))

    tensor = eval_transform(preprocessing)(image)

    assert tensor.shape == (3, 224, 224)
    expected = torch.tensor([(1 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.5, -0.5])
    torch.testing.assert_close(tensor.mean(dim=(1, 2)), expected)


def test_eval_transform_converts_grayscale():
    image = Image.new("L", (32, 32), 255)

    tensor = eval_transform(eval_preprocessing(32))(image)

    assert tensor.shape == (3, 32, 32)
