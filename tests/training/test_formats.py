import gzip
import io
import logging
import pickle
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from tests.training.files import write_image_folder
from training.augment import eval_preprocessing
from training.data import (
    CIFAR100Batches,
    IDXDataset,
    SkipUnreadable,
    TarShards,
    build_datasets,
    build_labelled_datasets,
    dataset_name,
    detect_source,
    load_rgb,
    load_sample_images,
)
from training.datasets import read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_cifar100(folder: Path, per_split: int = 6, meta: bool = True) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for split in ("train", "test"):
        batch = {
            b"data": rng.integers(0, 256, size=(per_split, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, size=per_split)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, size=per_split)],
        }
        (folder / split).write_bytes(pickle.dumps(batch))
        written[split] = batch
    if meta:
        names = [f"class{i:02d}".encode() for i in range(100)]
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, compress: bool, train: int = 20, test: int = 10):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            data = idx_bytes(array)
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[prefix] = (images, labels)
    return arrays


def jpeg_bytes(colour: tuple[int, int, int], size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path: Path, members: dict[str, bytes]) -> None:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_cifar100_fine_labels_and_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    written = write_cifar100(folder)

    train = CIFAR100Batches(tmp_path, "train")
    test = CIFAR100Batches(folder, "test")
    raw = written["test"][b"data"][2]

    assert detect_source(tmp_path) == "cifar100-batches"
    assert dataset_name(folder) == "cifar100"
    assert train.images.shape == (6, 32, 32, 3)
    assert test.labels.tolist() == written["test"][b"fine_labels"]
    assert test.images[2, 4, 9].tolist() == [
        raw[c * 1024 + 4 * 32 + 9] for c in range(3)
    ]
    assert len(test.classes) == 100
    assert test.classes[7] == "class07"


def test_cifar100_without_meta_uses_numbers(tmp_path):
    write_cifar100(tmp_path / "c100", meta=False)

    splits = build_datasets(tmp_path / "c100", image_size=16)

    assert splits.classes == tuple(str(i) for i in range(100))
    assert splits.name == "cifar100"
    assert splits.test[0][0].shape == (3, 16, 16)


def test_cifar100_rejects_cifar10_file(tmp_path):
    folder = tmp_path / "c100"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps(batch))

    with pytest.raises(ValueError, match="fine_labels"):
        CIFAR100Batches(folder, "train")


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_written_files(tmp_path, compress):
    arrays = write_idx_folder(tmp_path / "mnist", compress)

    train = IDXDataset(tmp_path / "mnist", "train")
    test = IDXDataset(tmp_path / "mnist", "test")
    image, label = test[3]

    assert detect_source(tmp_path / "mnist") == "idx"
    assert np.array_equal(train.images, arrays["train"][0])
    assert test.labels.tolist() == arrays["t10k"][1].tolist()
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), arrays["t10k"][0][3])
    assert label == 3
    assert train.classes == tuple(str(i) for i in range(10))


def test_idx_classes_file_and_normalisation(tmp_path):
    write_idx_folder(tmp_path / "fm", compress=True)
    names = [f"name{i}" for i in range(10)]
    (tmp_path / "fm" / "classes.txt").write_text("\n".join(names) + "\n")

    splits = build_datasets(tmp_path / "fm", image_size=32)
    (view1, _), _ = splits.train[0]
    pixels = splits.train.images / 255.0  # the raw grayscale training images

    assert splits.classes == tuple(names)
    assert splits.name == "idx:fm"
    assert view1.shape == (3, 32, 32)
    assert splits.preprocessing.mean[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert splits.preprocessing.std[0] == pytest.approx(pixels.std(), abs=1e-4)


def test_idx_truncated_file_raises(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-10])

    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_idx_rejects_other_type_codes(tmp_path):
    path = tmp_path / "floats-idx1"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">i", 1) + b"\0" * 4)

    with pytest.raises(ValueError, match="0x0d"):
        read_idx(path)


def test_fashion_mnist_debian_files():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install the Debian "
            "package dataset-fashion-mnist"
        )

    train = IDXDataset(FASHION_MNIST_DIR, "train")
    test = IDXDataset(FASHION_MNIST_DIR, "test")

    assert train.images.shape == (60000, 28, 28)
    assert test.images.shape == (10000, 28, 28)
    assert Counter(test.labels.tolist()) == {label: 1000 for label in range(10)}
    assert Counter(train.labels.tolist()) == {label: 6000 for label in range(10)}
    assert 0 < train.images.mean() < 255


def test_tar_shards_with_test_shard(tmp_path):
    colours = {"apple": (250, 0, 0), "leaf": (0, 200, 0)}
    for index, split in enumerate(["train-0", "train-1"]):
        write_shard(
            tmp_path / f"{split}.tar",
            {
                f"train/{c}/{index}{i}.jpg": jpeg_bytes(v)
                for c, v in colours.items()
                for i in range(3)
            },
        )
    write_shard(
        tmp_path / "test-0.tar.gz",
        {f"{c}/t{i}.png": jpeg_bytes(v) for c, v in colours.items() for i in range(2)}
        | {"README.txt": b"not an image"},
    )

    splits = build_datasets(tmp_path, image_size=8)
    image, label = splits.test[0]

    assert detect_source(tmp_path) == "tar-shards"
    assert dataset_name(tmp_path) == f"shards:{tmp_path.name}"
    assert splits.classes == ("apple", "leaf")
    assert len(splits.train) == 12
    assert len(splits.test) == 4
    assert image.shape == (3, 8, 8)
    assert label in (0, 1)


def test_tar_shards_split_without_test_shard(tmp_path):
    write_shard(
        tmp_path / "images.tar.gz",
        {
            f"c{c}/{i}.jpg": jpeg_bytes((40 * c, 0, 0))
            for c in range(2)
            for i in range(10)
        },
    )

    splits = build_datasets(tmp_path, image_size=8, seed=1)
    labels = Counter(splits.test[i][1] for i in range(len(splits.test)))

    assert len(splits.train) == 16
    assert labels == {0: 2, 1: 2}


def test_tar_shards_reject_member_without_class(tmp_path):
    write_shard(tmp_path / "train-0.tar", {"loose.jpg": jpeg_bytes((0, 0, 0))})

    with pytest.raises(ValueError, match="loose.jpg"):
        TarShards(tmp_path, "train")


def test_unlabelled_folder_trains_without_monitor(tmp_path, caplog):
    for i in range(6):
        Image.new("RGB", (20, 20), (30 * i, 10, 10)).save(tmp_path / f"{i}.png")

    with caplog.at_level(logging.INFO, logger="training.data"):
        splits = build_datasets(tmp_path, image_size=8)
    (view1, view2), label = splits.train[0]

    assert detect_source(tmp_path) == "unlabelled"
    assert len(splits.train) == 6
    assert label == -1
    assert view1.shape == (3, 8, 8)
    assert not splits.labelled
    assert "kNN monitor is skipped" in caplog.text
    assert len(load_sample_images(tmp_path, count=2)) == 2


def test_unlabelled_folder_with_eval_source(tmp_path):
    for i in range(4):
        Image.new("RGB", (20, 20), (30 * i, 10, 10)).save(tmp_path / f"{i}.png")

    splits = build_datasets(tmp_path, image_size=8, eval_source="digits")

    assert splits.labelled
    assert len(splits.memory) == 1437
    assert splits.test[0][0].shape == (3, 8, 8)
    assert splits.classes == tuple(str(d) for d in range(10))


def test_unlabelled_folder_rejected_for_evaluation(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")

    with pytest.raises(ValueError, match="no labels"):
        build_labelled_datasets(tmp_path, eval_preprocessing(8))


def test_image_folder_accepts_val_split(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3)
    write_image_folder(tmp_path / "val", per_class=1)

    splits = build_datasets(tmp_path, image_size=8)

    assert detect_source(tmp_path) == "imagefolder"
    assert len(splits.train) == 6
    assert len(splits.test) == 2


def write_corrupt_folder(root: Path) -> None:
    write_image_folder(root, per_class=4)
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(good.getvalue()[:200])
    (root / "dog" / "empty.jpg").write_bytes(b"")


def test_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    write_corrupt_folder(tmp_path / "train")
    write_image_folder(tmp_path / "test", per_class=1)
    splits = build_datasets(tmp_path, image_size=8)
    loader = DataLoader(splits.train, batch_size=5, num_workers=0)

    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        batches = list(loader)

    assert len(splits.train) == 10
    assert sum(len(labels) for _, labels in batches) == 10
    assert splits.skipped_images() == 2
    assert "truncated.jpg" in caplog.text
    assert "empty.jpg" in caplog.text


def test_corrupt_files_counted_across_workers(tmp_path):
    write_corrupt_folder(tmp_path / "train")
    write_image_folder(tmp_path / "test", per_class=1)
    splits = build_datasets(tmp_path, image_size=8)
    loader = DataLoader(splits.memory, batch_size=4, num_workers=2)

    images = sum(len(labels) for _, labels in loader)

    assert images == 10
    assert splits.skipped_images() == 2


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "cat").mkdir()
    for i in range(3):
        (tmp_path / "cat" / f"{i}.jpg").write_bytes(b"")
    dataset = SkipUnreadable(ImageFolder(tmp_path, loader=load_rgb), max_attempts=5)

    with pytest.raises(RuntimeError, match="unreadable"):
        dataset[0]
    assert dataset.skipped == 3
