"""Data sets read from disk or bundled with scikit-learn; nothing is downloaded.

Accepted sources for :func:`build_datasets`:

- ``"digits"``: scikit-learn's bundled handwritten digits (1,797 images of 8x8
  pixels), upscaled to 32x32 RGB and split 80/20 with a fixed seed.
- An image folder with one sub-folder per class (torchvision ``ImageFolder``),
  either with ``train/`` and ``test/`` sub-folders or as one folder that is split
  deterministically.
- CIFAR-10 in its python-batches layout (``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, or their parent folder ``cifar-10-batches-py``).
- CIFAR-10 as JPEG tar.gz shards (``train-0000s-of-00005.tar.gz``,
  ``test-00000-of-00001.tar.gz`` and ``classes.txt``).
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from service.bundle import Preprocessing
from service.preprocess import to_rgb
from training.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViews,
    eval_preprocessing,
    eval_transform,
    simclr_transform,
)

logger = logging.getLogger(__name__)

ImageDataset = Union["ImageArrayDataset", Subset, ImageFolder]
SourceKind = Literal["digits", "imagefolder", "cifar10-batches", "cifar10-shards"]

DIGITS_SIZE = 32
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ACCEPTED_LAYOUTS = (
    '"digits"; an image folder with one sub-folder per class (optionally inside '
    "train/ and test/); a CIFAR-10 python-batches folder (data_batch_1..5, "
    "test_batch); or a CIFAR-10 shard folder (train-*-of-*.tar.gz, "
    "test-*-of-*.tar.gz, classes.txt)"
)


class ImageArrayDataset(Dataset):
    """Images held in memory as uint8 [N, H, W, 3], returned as transformed PIL images.

    Args:
        images: uint8 array [N, H, W, 3], RGB.
        labels: int array [N].
        transform: Applied to each PIL image; ``None`` returns the PIL image.
        classes: Class names; label ``i`` is ``classes[i]``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: tuple[str, ...] = (),
    ) -> None:
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be a uint8 array [N, H, W, 3], got {images.dtype} "
                f"{images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"got {len(images)} images but {len(labels)} labels; pass one label "
                "per image"
            )
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            return self.transform(image), int(self.labels[index])
        return image, int(self.labels[index])

    def with_transform(
        self, transform: Callable[[Image.Image], Any] | None
    ) -> ImageArrayDataset:
        """Return a view of the same arrays with another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other


def load_rgb(path: str) -> Image.Image:
    """Open an image file upright and in RGB, as the service decodes uploads.

    EXIF orientation is applied and transparency is composited over white, the
    same steps as ``service.preprocess.decode_image``, so that training and
    serving see the same pixels.
    """
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright)


def load_digits_images(seed: int = 0, test_fraction: float = 0.2) -> dict[str, Any]:
    """Load scikit-learn's digits as 32x32 RGB uint8 arrays, split per class.

    Returns:
        A dict with ``train`` and ``test``, each a tuple (images [N, 32, 32, 3],
        labels [N]).
    """
    digits = load_digits()
    # Pixel values are counts from 0 to 16; scale them to 0..255.
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack(
        [
            np.asarray(
                Image.fromarray(image, mode="L")
                .resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)
                .convert("RGB")
            )
            for image in small
        ]
    )
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels,
    )
    return {
        "train": (images[train_idx], labels[train_idx]),
        "test": (images[test_idx], labels[test_idx]),
    }


def _python_batches_dir(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


class CIFAR10Batches(ImageArrayDataset):
    """CIFAR-10 in the python-batches layout, read into memory.

    Each batch file is a pickled dict with ``b"data"`` (uint8 [N, 3072], channel
    planes of 32x32) and ``b"labels"``.

    Args:
        root: The folder with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``,
            or its parent.
        split: ``"train"`` (the five data batches) or ``"test"``.
        transform: Applied to each PIL image.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        folder = _python_batches_dir(Path(root))
        if folder is None:
            raise ValueError(
                f"{root} has no data_batch_1; pass the cifar-10-batches-py folder"
            )
        if split == "train":
            files = sorted(folder.glob("data_batch_*"))
        elif split == "test":
            files = [folder / "test_batch"]
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")

        images, labels = [], []
        for file in files:
            if not file.is_file():
                raise ValueError(f"{file} not found; the CIFAR-10 folder is incomplete")
            with file.open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        super().__init__(
            np.ascontiguousarray(np.concatenate(images)),
            np.concatenate(labels),
            transform,
            CIFAR10_CLASSES,
        )


def read_cifar10_shards(
    root: str | Path,
    split: Literal["train", "test"],
    max_shards: int | None = None,
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decode the JPEGs of CIFAR-10 tar.gz shards into memory.

    Each shard contains files named ``<split>/<class_name>/<NNNN>.jpg``. The label
    is the line number of the class name in ``classes.txt``, counted from 0.

    Args:
        root: The shard folder.
        split: ``"train"`` or ``"test"``.
        max_shards: Read at most this many shards, in file-name order.
        max_images: Stop after this many images.

    Returns:
        images uint8 [N, 32, 32, 3], labels int64 [N], and the class names.
    """
    root = Path(root)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise ValueError(f"{classes_file} not found; pass the CIFAR-10 shard folder")
    classes = tuple(classes_file.read_text().split())
    class_index = {name: i for i, name in enumerate(classes)}

    shards = sorted(root.glob(f"{split}-*-of-*.tar.gz"))
    if not shards:
        raise ValueError(f"{root} has no {split}-*-of-*.tar.gz shards")
    if max_shards is not None:
        shards = shards[:max_shards]

    images: list[np.ndarray] = []
    labels: list[int] = []
    for shard in shards:
        logger.info("reading %s", shard)
        with tarfile.open(shard, "r:gz") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                class_name = member.name.split("/")[1]
                data = archive.extractfile(member)
                if data is None or class_name not in class_index:
                    raise ValueError(
                        f"{shard} has an unexpected member {member.name!r}; expected "
                        "<split>/<class_name>/<NNNN>.jpg with a class in classes.txt"
                    )
                with Image.open(io.BytesIO(data.read())) as image:
                    images.append(np.asarray(image.convert("RGB")))
                labels.append(class_index[class_name])
                if max_images is not None and len(images) >= max_images:
                    break
        if max_images is not None and len(images) >= max_images:
            break
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


class CIFAR10Shards(ImageArrayDataset):
    """CIFAR-10 read from JPEG tar.gz shards into memory.

    Args:
        root: The shard folder (with ``classes.txt``).
        split: ``"train"`` or ``"test"``.
        transform: Applied to each PIL image.
        max_shards: Read at most this many shards of the split (10,000 images each).
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        max_shards: int | None = None,
    ) -> None:
        images, labels, classes = read_cifar10_shards(root, split, max_shards)
        super().__init__(images, labels, transform, classes)


def _is_class_folder_root(path: Path) -> bool:
    """Return True if ``path`` has a sub-folder that contains an image file."""
    for child in path.iterdir():
        if child.is_dir() and any(
            f.suffix.lower() in IMG_EXTENSIONS for f in child.iterdir() if f.is_file()
        ):
            return True
    return False


def detect_source(source: str | Path) -> SourceKind:
    """Detect the kind of data source from its files.

    Raises:
        ValueError: the path does not exist or matches no accepted layout.
    """
    if str(source) == "digits":
        return "digits"
    path = Path(source)
    if not path.is_dir():
        raise ValueError(
            f"data source {str(source)!r} not found; pass {ACCEPTED_LAYOUTS}"
        )
    if _python_batches_dir(path) is not None:
        return "cifar10-batches"
    if (path / "classes.txt").is_file() and any(path.glob("train-*-of-*.tar.gz")):
        return "cifar10-shards"
    split_dirs = [path / "train", path / "test"]
    if all(d.is_dir() and _is_class_folder_root(d) for d in split_dirs):
        return "imagefolder"
    if _is_class_folder_root(path):
        return "imagefolder"
    raise ValueError(
        f"data source {str(path)!r} matches no accepted layout; pass {ACCEPTED_LAYOUTS}"
    )


def dataset_name(source: str | Path) -> str:
    """Return a short name of the data source, for the training provenance."""
    kind = detect_source(source)
    if kind == "digits":
        return "sklearn-digits"
    if kind == "cifar10-batches":
        return "cifar10"
    if kind == "cifar10-shards":
        return "cifar10-jpeg"
    return f"imagefolder:{Path(source).resolve().name}"


@dataclass
class DataSplits:
    """The data sets of one training run.

    Attributes:
        train: Training images, each returned as two augmented views.
        memory: The same training images with the evaluation transform, for the
            kNN monitor's memory bank.
        test: Test images with the evaluation transform.
        name: Short name of the source, for the provenance.
        preprocessing: The evaluation preprocessing (also the bundle's).
        classes: Class names; label ``i`` is ``classes[i]``.
    """

    train: ImageDataset
    memory: ImageDataset
    test: ImageDataset
    name: str
    preprocessing: Preprocessing
    classes: tuple[str, ...]


def _normalisation(kind: SourceKind, train_images: np.ndarray | None) -> tuple:
    if kind in ("cifar10-batches", "cifar10-shards"):
        return CIFAR10_MEAN, CIFAR10_STD
    if kind == "digits" and train_images is not None:
        pixels = train_images.reshape(-1, 3).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in pixels.mean(axis=0))
        std = tuple(round(float(v), 4) for v in pixels.std(axis=0))
        return mean, std
    return IMAGENET_MEAN, IMAGENET_STD


def _image_folder_splits(
    path: Path, seed: int, test_fraction: float
) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
    """Split an image folder into untransformed train and test sets."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        train = ImageFolder(path / "train", loader=load_rgb)
        test = ImageFolder(path / "test", loader=load_rgb)
        if train.classes != test.classes:
            raise ValueError(
                f"{path}/train and {path}/test have different class folders "
                f"({train.classes} and {test.classes}); use the same class names"
            )
        return train, test, tuple(train.classes)

    full = ImageFolder(path, loader=load_rgb)
    train_idx, test_idx = train_test_split(
        np.arange(len(full.targets)),
        test_size=test_fraction,
        random_state=seed,
        stratify=full.targets,
    )
    return Subset(full, train_idx), Subset(full, test_idx), tuple(full.classes)


def _with_transform(dataset: ImageDataset, transform: Callable | None) -> ImageDataset:
    """Return a copy of an ImageFolder, a Subset of one, or an array data set."""
    if isinstance(dataset, ImageArrayDataset):
        return dataset.with_transform(transform)
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    if isinstance(dataset, ImageFolder):
        other = copy.copy(dataset)
        other.transform = transform
        return other
    raise TypeError(f"cannot set a transform on {type(dataset).__name__}")


def build_datasets(
    source: str | Path = "digits",
    image_size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> DataSplits:
    """Build the training, memory-bank and test sets of a data source.

    Args:
        source: ``"digits"`` or a path; see the module docstring for the layouts.
        image_size: Side of the crops, in pixels.
        seed: Seed of the train/test split where the source has none.
        test_fraction: Fraction of the images held out where the source has no
            test split.

    Raises:
        ValueError: the source is missing or matches no accepted layout.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    kind = detect_source(source)
    logger.info("loading data source %s (%s)", source, kind)

    train: ImageDataset
    test: ImageDataset
    if kind == "digits":
        arrays = load_digits_images(seed, test_fraction)
        classes = tuple(str(d) for d in range(10))
        train_images, train_labels = arrays["train"]
        test_images, test_labels = arrays["test"]
        train = ImageArrayDataset(train_images, train_labels, classes=classes)
        test = ImageArrayDataset(test_images, test_labels, classes=classes)
    elif kind == "cifar10-batches":
        train = CIFAR10Batches(source, "train")
        test = CIFAR10Batches(source, "test")
        classes = CIFAR10_CLASSES
    elif kind == "cifar10-shards":
        train = CIFAR10Shards(source, "train")
        test = CIFAR10Shards(source, "test")
        classes = train.classes
    else:
        train, test, classes = _image_folder_splits(Path(source), seed, test_fraction)

    array = train.images if isinstance(train, ImageArrayDataset) else None
    mean, std = _normalisation(kind, array)
    preprocessing = eval_preprocessing(image_size, mean, std)
    evaluation = eval_transform(preprocessing)
    views = TwoViews(simclr_transform(image_size, mean, std))

    splits = DataSplits(
        train=_with_transform(train, views),
        memory=_with_transform(train, evaluation),
        test=_with_transform(test, evaluation),
        name=dataset_name(source),
        preprocessing=preprocessing,
        classes=classes,
    )
    logger.info(
        "data %s: %d train and %d test images, %d classes",
        splits.name,
        len(splits.train),
        len(splits.test),
        len(classes),
    )
    return splits


def load_sample_images(
    source: str | Path = "digits", count: int = 8, seed: int = 0
) -> list[Image.Image]:
    """Return the first ``count`` test images of a source as RGB PIL images.

    Reads only what it needs from a shard folder (part of the test shard).
    """
    kind = detect_source(source)
    if kind == "cifar10-shards":
        images, _, _ = read_cifar10_shards(source, "test", max_images=count)
        return [Image.fromarray(image) for image in images]
    if kind == "digits":
        images = load_digits_images(seed)["test"][0][:count]
        return [Image.fromarray(image) for image in images]
    if kind == "cifar10-batches":
        batches = CIFAR10Batches(source, "test")
        return [Image.fromarray(image) for image in batches.images[:count]]

    _, test, _ = _image_folder_splits(Path(source), seed, 0.2)
    samples = []
    for i in range(min(count, len(test))):
        image, _ = test[i]
        samples.append(image.convert("RGB"))
    return samples
