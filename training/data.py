"""Data sources read from disk or bundled with scikit-learn; nothing is downloaded.

Accepted sources for :func:`build_datasets`:

- ``"digits"``: scikit-learn's bundled handwritten digits (1,797 images of 8x8
  pixels), upscaled to 32x32 RGB and split 80/20 with a fixed seed.
- CIFAR-10 in its python-batches layout (``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, or their parent folder ``cifar-10-batches-py``).
- CIFAR-100 in its python layout (``train``, ``test`` and optionally ``meta``, or
  their parent folder ``cifar-100-python``), with the 100 fine labels.
- MNIST-style IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``),
  as MNIST and Fashion-MNIST ship them.
- Tar shards (``*.tar``, ``*.tar.gz``, ``*.tgz``) whose image members sit in class
  folders (``[<split>/]<class>/<file>``). Shards named ``test*`` or ``val*`` are
  the test split. An optional ``classes.txt`` fixes the label order.
- An image folder with one sub-folder per class (torchvision ``ImageFolder``),
  either with ``train/`` and ``test/`` (or ``val/``) sub-folders or as one folder.
- A folder of images without class sub-folders: unlabelled, for training only.

Sources without a test split are split deterministically. Files that Pillow cannot
read are skipped with a warning and counted (:class:`SkipUnreadable`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from service.bundle import Preprocessing
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
from training.datasets import (
    CIFAR10_CLASSES,
    CIFAR10Batches,
    CIFAR100Batches,
    EncodedImageDataset,
    IDXDataset,
    ImageArrayDataset,
    SkipUnreadable,
    TarShards,
    UnlabelledImageFolder,
    cifar100_dir,
    has_idx_files,
    is_image_file,
    is_test_shard,
    list_shards,
    load_rgb,
    python_batches_dir,
    shard_classes,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10Batches",
    "CIFAR100Batches",
    "DataSplits",
    "IDXDataset",
    "ImageArrayDataset",
    "SkipUnreadable",
    "TarShards",
    "UnlabelledImageFolder",
    "build_datasets",
    "build_labelled_datasets",
    "dataset_name",
    "detect_source",
    "load_digits_images",
    "load_rgb",
    "load_sample_images",
]

logger = logging.getLogger(__name__)

ImageDataset = (
    ImageArrayDataset
    | EncodedImageDataset
    | UnlabelledImageFolder
    | SkipUnreadable
    | Subset
    | ImageFolder
)
SourceKind = Literal[
    "digits",
    "cifar10-batches",
    "cifar100-batches",
    "idx",
    "tar-shards",
    "imagefolder",
    "unlabelled",
]

DIGITS_SIZE = 32
# Mean and std per channel of the CIFAR-100 training images, in [0, 1].
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TEST_FOLDER_NAMES = ("test", "val")
ACCEPTED_LAYOUTS = (
    '"digits"; a CIFAR-10 python-batches folder (data_batch_1..5, test_batch); a '
    "CIFAR-100 python folder (train, test); MNIST-style IDX files "
    "(train-images-idx3-ubyte[.gz] and the labels file); tar shards (*.tar, "
    "*.tar.gz) with class folders in their member names; an image folder with one "
    "sub-folder per class (optionally inside train/ and test/); or a folder of "
    "images (unlabelled)"
)


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


def _is_class_folder_root(path: Path) -> bool:
    """Return True if ``path`` has a sub-folder that contains an image file."""
    for child in path.iterdir():
        if child.is_dir() and any(
            is_image_file(f.name) for f in child.iterdir() if f.is_file()
        ):
            return True
    return False


def _test_folder(path: Path) -> Path | None:
    for name in TEST_FOLDER_NAMES:
        if (path / name).is_dir() and _is_class_folder_root(path / name):
            return path / name
    return None


def detect_source(source: str | Path) -> SourceKind:
    """Detect the kind of data source from its files.

    Raises:
        ValueError: the path does not exist or matches no accepted layout.
    """
    if str(source) == "digits":
        return "digits"
    path = Path(source)
    if path.is_file():
        raise ValueError(
            f"data source {str(source)!r} is a file, not a folder; pass the folder "
            f"that contains it ({str(path.parent)!r})"
        )
    if not path.is_dir():
        raise ValueError(
            f"data source {str(source)!r} not found; pass {ACCEPTED_LAYOUTS}"
        )
    if python_batches_dir(path) is not None:
        return "cifar10-batches"
    if cifar100_dir(path) is not None:
        return "cifar100-batches"
    if has_idx_files(path):
        return "idx"
    if list_shards(path):
        return "tar-shards"
    train_dir = path / "train"
    if train_dir.is_dir() and _is_class_folder_root(train_dir) and _test_folder(path):
        return "imagefolder"
    if _is_class_folder_root(path):
        return "imagefolder"
    if any(p.is_file() and is_image_file(p.name) for p in path.iterdir()):
        return "unlabelled"
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
    if kind == "cifar100-batches":
        return "cifar100"
    if kind == "tar-shards" and shard_classes(Path(source)) == CIFAR10_CLASSES:
        return "cifar10-jpeg"
    prefix = {"tar-shards": "shards", "unlabelled": "images"}.get(kind, kind)
    return f"{prefix}:{Path(source).resolve().name}"


@dataclass
class DataSplits:
    """The data sets of one training run.

    Attributes:
        train: Training images, each returned as two augmented views.
        memory: Labelled training images with the evaluation transform, for the
            kNN monitor's memory bank; empty when there are no labels.
        test: Test images with the evaluation transform; empty when there are no
            labels.
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

    @property
    def labelled(self) -> bool:
        """Whether the kNN monitor has a memory bank and a test set."""
        return len(self.memory) > 0 and len(self.test) > 0

    def skipped_images(self) -> int:
        """Return how many unreadable images the splits have skipped so far."""
        counters: dict[int, int] = {}
        for dataset in (self.train, self.memory, self.test):
            wrapper = _find_skip_wrapper(dataset)
            if wrapper is not None:
                counters[wrapper.counter_id] = wrapper.skipped
        return sum(counters.values())


def _find_skip_wrapper(dataset: Dataset) -> SkipUnreadable | None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, SkipUnreadable) else None


def _grey_statistics(images: np.ndarray) -> tuple[tuple, tuple]:
    """Return mean and std of uint8 pixels in [0, 1], the same for each channel."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    return (round(mean, 4),) * 3, (round(std, 4),) * 3


def _normalisation(
    kind: SourceKind, train: Dataset, classes: tuple[str, ...]
) -> tuple[tuple, tuple]:
    if kind == "cifar10-batches" or (
        kind == "tar-shards" and classes == CIFAR10_CLASSES
    ):
        return CIFAR10_MEAN, CIFAR10_STD
    if kind == "cifar100-batches":
        return CIFAR100_MEAN, CIFAR100_STD
    if kind == "idx" and isinstance(train, ImageArrayDataset):
        return _grey_statistics(train.images)
    if kind == "digits" and isinstance(train, ImageArrayDataset):
        pixels = train.images.reshape(-1, 3).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in pixels.mean(axis=0))
        std = tuple(round(float(v), 4) for v in pixels.std(axis=0))
        return mean, std
    return IMAGENET_MEAN, IMAGENET_STD


def _split(
    dataset: Dataset,
    labels: np.ndarray,
    seed: int,
    test_fraction: float,
    *,
    source: Path,
    classes: Sequence[str],
    presplit_hint: str,
) -> tuple[Subset, Subset]:
    """Split a labelled data set per class, deterministically for a seed.

    Raises:
        ValueError: a class has too few images for a split per class; the message
            names ``source``, the image count of each class and ``presplit_hint``.
    """
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)),
            test_size=test_fraction,
            random_state=seed,
            stratify=labels,
        )
    except ValueError as exc:
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        found = ", ".join(
            f"{name}: {count}" for name, count in zip(classes, counts, strict=True)
        )
        raise ValueError(
            f"cannot split {source} into train and test sets per class "
            f"(test_fraction {test_fraction:g}); images per class: {found}. Every "
            "class needs at least 2 images, and each set needs at least one image "
            f"per class ({len(classes)} classes). Add images, or {presplit_hint} "
            f"(scikit-learn: {exc})"
        ) from exc
    return Subset(dataset, train_idx), Subset(dataset, test_idx)


def _image_folder_splits(
    path: Path, seed: int, test_fraction: float
) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
    """Split an image folder into untransformed train and test sets."""
    test_dir = _test_folder(path)
    if (path / "train").is_dir() and test_dir is not None:
        train_folder = ImageFolder(path / "train", loader=load_rgb)
        test_folder = ImageFolder(test_dir, loader=load_rgb)
        if train_folder.classes != test_folder.classes:
            raise ValueError(
                f"{path}/train and {test_dir} have different class folders "
                f"({train_folder.classes} and {test_folder.classes}); use the same "
                "class names"
            )
        return (
            SkipUnreadable(train_folder),
            SkipUnreadable(test_folder),
            tuple(train_folder.classes),
        )

    full = ImageFolder(path, loader=load_rgb)
    train, test = _split(
        SkipUnreadable(full),
        np.asarray(full.targets),
        seed,
        test_fraction,
        source=path,
        classes=full.classes,
        presplit_hint="give train/ and test/ folders with the same class folders",
    )
    return train, test, tuple(full.classes)


def _shard_splits(
    path: Path, seed: int, test_fraction: float
) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
    if any(is_test_shard(shard) for shard in list_shards(path)):
        train = TarShards(path, "train")
        test = TarShards(path, "test")
        return SkipUnreadable(train), SkipUnreadable(test), train.classes
    full = TarShards(path, "all")
    train_part, test_part = _split(
        SkipUnreadable(full),
        full.labels,
        seed,
        test_fraction,
        source=path,
        classes=full.classes,
        presplit_hint="add test shards (names starting with test or val)",
    )
    return train_part, test_part, full.classes


def _raw_splits(
    source: str | Path, kind: SourceKind, seed: int, test_fraction: float
) -> tuple[ImageDataset, ImageDataset | None, tuple[str, ...]]:
    """Build the untransformed train and test sets; test is ``None`` if unlabelled."""
    if kind == "digits":
        arrays = load_digits_images(seed, test_fraction)
        classes = tuple(str(d) for d in range(10))
        train = ImageArrayDataset(*arrays["train"], classes=classes)
        return train, ImageArrayDataset(*arrays["test"], classes=classes), classes
    if kind == "cifar10-batches":
        test = CIFAR10Batches(source, "test")
        return CIFAR10Batches(source, "train"), test, test.classes
    if kind == "cifar100-batches":
        test = CIFAR100Batches(source, "test")
        return CIFAR100Batches(source, "train"), test, test.classes
    if kind == "idx":
        test = IDXDataset(source, "test")
        return IDXDataset(source, "train"), test, test.classes
    if kind == "tar-shards":
        return _shard_splits(Path(source), seed, test_fraction)
    if kind == "imagefolder":
        return _image_folder_splits(Path(source), seed, test_fraction)
    return SkipUnreadable(UnlabelledImageFolder(source)), None, ()


def _with_transform(dataset: Dataset, transform: Callable | None) -> ImageDataset:
    """Return a copy of a data set (or of a Subset of one) with another transform."""
    if isinstance(dataset, SkipUnreadable):
        return dataset.with_dataset(_with_transform(dataset.dataset, transform))
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    if isinstance(dataset, ImageFolder):
        other = copy.copy(dataset)
        other.transform = transform
        return other
    with_transform = getattr(dataset, "with_transform", None)
    if with_transform is None:
        raise TypeError(f"cannot set a transform on {type(dataset).__name__}")
    return with_transform(transform)


def build_labelled_datasets(
    source: str | Path,
    preprocessing: Preprocessing,
    seed: int = 0,
    test_fraction: float = 0.2,
    transform: Callable[[Image.Image], Any] | None = None,
) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
    """Build the train and test sets of a labelled source for evaluation.

    Args:
        source: ``"digits"`` or a path; see the module docstring for the layouts.
        preprocessing: The model's evaluation preprocessing.
        seed: Seed of the train/test split where the source has none.
        test_fraction: Fraction held out where the source has no test split.
        transform: Replaces the evaluation transform built from ``preprocessing``
            (for example, the service's NumPy preprocessing).

    Returns:
        The train set, the test set and the class names.

    Raises:
        ValueError: the source is missing, matches no layout, or has no labels.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    kind = detect_source(source)
    train, test, classes = _raw_splits(source, kind, seed, test_fraction)
    if test is None:
        raise ValueError(
            f"data source {str(source)!r} has no labels (images without class "
            "sub-folders); pass a labelled source for evaluation"
        )
    chosen = transform if transform is not None else eval_transform(preprocessing)
    return _with_transform(train, chosen), _with_transform(test, chosen), classes


def build_datasets(
    source: str | Path = "digits",
    image_size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.2,
    eval_source: str | Path | None = None,
    crop_min_scale: float | None = None,
    horizontal_flip: bool = True,
) -> DataSplits:
    """Build the training, memory-bank and test sets of a data source.

    Args:
        source: ``"digits"`` or a path; see the module docstring for the layouts.
        image_size: Side of the crops, in pixels.
        seed: Seed of the train/test split where the source has none.
        test_fraction: Fraction of the images held out where the source has no
            test split.
        eval_source: A labelled source whose train and test splits become the kNN
            monitor's memory bank and test set, in place of the training source's.
            The normalisation stays that of ``source``.
        crop_min_scale: Lower crop scale of the augmentation; default: the SimCLR
            value for the image size.
        horizontal_flip: Whether the augmentation flips images horizontally.

    Raises:
        ValueError: a source is missing or matches no accepted layout, or
            ``eval_source`` has no labels.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    kind = detect_source(source)
    logger.info("loading data source %s (%s)", source, kind)
    train, test, classes = _raw_splits(source, kind, seed, test_fraction)

    mean, std = _normalisation(kind, train, classes)
    preprocessing = eval_preprocessing(image_size, mean, std)
    evaluation = eval_transform(preprocessing)
    views = TwoViews(
        simclr_transform(image_size, mean, std, crop_min_scale, horizontal_flip)
    )

    if eval_source is not None:
        memory, test, classes = build_labelled_datasets(
            eval_source, preprocessing, seed, test_fraction
        )
        logger.info("the kNN monitor uses the labelled source %s", eval_source)
    elif test is None:
        memory = test = Subset(train, [])
        logger.info(
            "data source %s has no labels: the kNN monitor is skipped; pass "
            "eval_data (a labelled source) to monitor training",
            source,
        )
    else:
        memory = _with_transform(train, evaluation)
        test = _with_transform(test, evaluation)

    splits = DataSplits(
        train=_with_transform(train, views),
        memory=memory,
        test=test,
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
    """Return the first ``count`` readable test images of a source as RGB images.

    Reads only what it needs from a shard folder. For an unlabelled folder the
    first files of the folder are returned.
    """
    kind = detect_source(source)
    if kind == "tar-shards":
        path = Path(source)
        split = "test" if any(map(is_test_shard, list_shards(path))) else "all"
        shards = TarShards(path, split, max_images=count)
        return [shards[i][0] for i in range(len(shards))]
    if kind == "digits":
        images = load_digits_images(seed)["test"][0][:count]
        return [Image.fromarray(image) for image in images]

    train, test, _ = _raw_splits(source, kind, seed, 0.2)
    dataset = test if test is not None else train
    samples = []
    for i in range(min(count, len(dataset))):
        image, _ = dataset[i]
        samples.append(image.convert("RGB"))
    return samples
