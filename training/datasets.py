"""Readers of image data set formats, and the wrapper that skips unreadable files.

Every data set here returns ``(image, label)`` with ``image`` a PIL image passed
through the data set's ``transform``. Unlabelled images get the label ``-1``.
"""

from __future__ import annotations

import copy
import gzip
import io
import logging
import multiprocessing
import pickle
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from service.preprocess import to_rgb

logger = logging.getLogger(__name__)

UNLABELLED = -1
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
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Errors that Pillow raises for a missing, empty, truncated or malformed file.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)
# Warnings logged per process for unreadable files; later ones are only counted.
MAX_SKIP_WARNINGS = 20


def is_image_file(name: str) -> bool:
    """Return True if the file name has an extension that torchvision reads."""
    return name.lower().endswith(IMG_EXTENSIONS)


def load_rgb(path: str) -> Image.Image:
    """Open an image file upright and in RGB, as the service decodes uploads.

    EXIF orientation is applied and transparency is composited over white, the
    same steps as ``service.preprocess.decode_image``, so that training and
    serving see the same pixels.
    """
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes upright and in RGB, like :func:`load_rgb`."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright)


class ImageArrayDataset(Dataset):
    """Images held in memory as uint8 arrays, returned as transformed PIL images.

    Args:
        images: uint8 array [N, H, W, 3] (RGB) or [N, H, W] (grayscale).
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
        rgb = images.ndim == 4 and images.shape[3] == 3
        if not (rgb or images.ndim == 3) or images.dtype != np.uint8:
            raise ValueError(
                "images must be a uint8 array [N, H, W, 3] or [N, H, W], got "
                f"{images.dtype} {images.shape}"
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


def python_batches_dir(path: Path) -> Path | None:
    """Return the CIFAR-10 python-batches folder at ``path`` or inside it."""
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _unpickle(file: Path) -> dict[bytes, Any]:
    if not file.is_file():
        raise ValueError(f"{file} not found; the CIFAR folder is incomplete")
    with file.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def _planes_to_images(data: Any) -> np.ndarray:
    """Convert CIFAR rows of three 32x32 channel planes to uint8 [N, 32, 32, 3]."""
    rows = np.asarray(data, dtype=np.uint8)
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


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
        folder = python_batches_dir(Path(root))
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
            batch = _unpickle(file)
            images.append(_planes_to_images(batch[b"data"]))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        super().__init__(
            np.concatenate(images), np.concatenate(labels), transform, CIFAR10_CLASSES
        )


def cifar100_dir(path: Path) -> Path | None:
    """Return the CIFAR-100 folder (``train``, ``test``) at or inside ``path``."""
    for candidate in (path, path / "cifar-100-python"):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    return None


class CIFAR100Batches(ImageArrayDataset):
    """CIFAR-100 in the python layout, read into memory, with the 100 fine labels.

    The ``train`` and ``test`` files are pickled dicts with ``b"data"`` (uint8
    [N, 3072], channel planes of 32x32) and ``b"fine_labels"``. Class names come
    from ``b"fine_label_names"`` in the ``meta`` file, or are the label numbers
    when ``meta`` is absent.

    Args:
        root: The ``cifar-100-python`` folder or its parent.
        split: ``"train"`` or ``"test"``.
        transform: Applied to each PIL image.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        folder = cifar100_dir(Path(root))
        if folder is None:
            raise ValueError(
                f"{root} has no CIFAR-100 train and test files; pass the "
                "cifar-100-python folder"
            )
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        batch = _unpickle(folder / split)
        if b"fine_labels" not in batch:
            raise ValueError(
                f"{folder / split} has no fine_labels; it is not a CIFAR-100 file"
            )
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
        if (folder / "meta").is_file():
            names = _unpickle(folder / "meta")[b"fine_label_names"]
            classes = tuple(name.decode() for name in names)
        else:
            classes = tuple(str(i) for i in range(100))
        super().__init__(_planes_to_images(batch[b"data"]), labels, transform, classes)


# Type codes of the IDX format that this reader accepts.
_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, as uint8.

    The header is two zero bytes, a type code (0x08 for unsigned bytes), the
    number of dimensions, then each dimension as a big-endian int32.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file: its header is invalid")
    type_code, ndim = data[2], data[3]
    if type_code != _IDX_UBYTE:
        raise ValueError(
            f"{path} has IDX type code {type_code:#04x}; only unsigned bytes "
            f"({_IDX_UBYTE:#04x}) are supported"
        )
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", data[4:header_size])
    expected = int(np.prod(shape))
    if len(data) - header_size != expected:
        raise ValueError(
            f"{path} has {len(data) - header_size} data bytes but its header "
            f"announces {shape} = {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


_IDX_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def find_idx_file(folder: Path, split: str, kind: Literal["images", "labels"]) -> Path:
    """Find ``<prefix>-images-idx3-ubyte[.gz]`` or the labels file of a split.

    Raises:
        ValueError: no such file exists.
    """
    ndim = 3 if kind == "images" else 1
    for prefix in _IDX_PREFIXES[split]:
        stem = f"{prefix}-{kind}-idx{ndim}-ubyte"
        for name in (stem, stem + ".gz"):
            matches = sorted(folder.glob(f"*{name}"))
            if matches:
                return matches[0]
    raise ValueError(
        f"{folder} has no {split} {kind} file; expected "
        f"{_IDX_PREFIXES[split][0]}-{kind}-idx{ndim}-ubyte[.gz]"
    )


def has_idx_files(folder: Path) -> bool:
    """Return True if ``folder`` has a training images file in the IDX format."""
    try:
        find_idx_file(folder, "train", "images")
    except ValueError:
        return False
    return True


class IDXDataset(ImageArrayDataset):
    """MNIST-style IDX files read into memory as grayscale images.

    Accepts the MNIST and Fashion-MNIST file names (``train-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, optionally gzip-compressed with ``.gz``). Class
    names come from ``classes.txt`` (one per line) when present, else they are the
    label numbers.

    Args:
        root: The folder with the four files.
        split: ``"train"`` or ``"test"``.
        transform: Applied to each PIL image (mode ``"L"``).
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        folder = Path(root)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images = read_idx(find_idx_file(folder, split, "images"))
        labels = read_idx(find_idx_file(folder, split, "labels")).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(
                f"{folder} has IDX arrays of shape {images.shape} and {labels.shape};"
                " expected images [N, H, W] and labels [N]"
            )
        classes_file = folder / "classes.txt"
        if classes_file.is_file():
            classes = tuple(classes_file.read_text().splitlines())
        else:
            classes = tuple(str(i) for i in range(int(labels.max()) + 1))
        super().__init__(images, labels, transform, classes)


def list_shards(root: Path) -> list[Path]:
    """Return the tar shards of a folder (``.tar``, ``.tar.gz``, ``.tgz``), sorted."""
    return sorted(
        p for p in root.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES)
    )


def is_test_shard(path: Path) -> bool:
    """Return True for shards whose name starts with ``test`` or ``val``."""
    return path.name.lower().startswith(("test", "val"))


def read_tar_shards(
    shards: list[Path],
    classes: tuple[str, ...] | None = None,
    max_images: int | None = None,
) -> tuple[list[bytes], list[str], list[str]]:
    """Read the encoded image files of tar shards into memory, without decoding.

    The class of a member is the name of its parent folder, so
    ``train/cat/0001.jpg`` and ``cat/0001.jpg`` are both of class ``cat``.
    Members that are not image files are ignored.

    Args:
        shards: Tar files, optionally gzip-compressed.
        classes: Accepted class names; ``None`` accepts any.
        max_images: Stop after this many images.

    Returns:
        The encoded images, their class names and their member names.

    Raises:
        ValueError: an image has no parent folder or a class outside ``classes``.
    """
    accepted = set(classes) if classes is not None else None
    encoded: list[bytes] = []
    class_names: list[str] = []
    member_names: list[str] = []
    for shard in shards:
        logger.info("reading %s", shard)
        with tarfile.open(shard, "r:*") as archive:
            for member in archive:
                if not member.isfile() or not is_image_file(member.name):
                    continue
                parts = member.name.strip("/").split("/")
                class_name = parts[-2] if len(parts) >= 2 else None
                if class_name is None or (
                    accepted is not None and class_name not in accepted
                ):
                    raise ValueError(
                        f"{shard} has an unexpected member {member.name!r}; expected "
                        "[<split>/]<class_name>/<file> with a class in classes.txt"
                    )
                data = archive.extractfile(member)
                if data is None:
                    raise ValueError(f"{shard}: cannot read member {member.name!r}")
                encoded.append(data.read())
                class_names.append(class_name)
                member_names.append(f"{shard.name}:{member.name}")
                if max_images is not None and len(encoded) >= max_images:
                    return encoded, class_names, member_names
    return encoded, class_names, member_names


class EncodedImageDataset(Dataset):
    """Encoded image files held in memory, decoded on access.

    Args:
        encoded: The bytes of each image file.
        labels: int array [N].
        names: A name per image (used in warnings about unreadable files).
        transform: Applied to each decoded RGB PIL image.
        classes: Class names; label ``i`` is ``classes[i]``.
    """

    def __init__(
        self,
        encoded: list[bytes],
        labels: np.ndarray,
        names: list[str],
        transform: Callable[[Image.Image], Any] | None = None,
        classes: tuple[str, ...] = (),
    ) -> None:
        if not len(encoded) == len(labels) == len(names):
            raise ValueError(
                f"got {len(encoded)} images, {len(labels)} labels and {len(names)} "
                "names; pass one label and one name per image"
            )
        self.encoded = encoded
        self.labels = np.asarray(labels, dtype=np.int64)
        self.names = names
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = decode_rgb(self.encoded[index])
        if self.transform is not None:
            return self.transform(image), int(self.labels[index])
        return image, int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.names[index]

    def with_transform(
        self, transform: Callable[[Image.Image], Any] | None
    ) -> EncodedImageDataset:
        """Return a view of the same images with another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other


class TarShards(EncodedImageDataset):
    """Images from tar shards with class sub-folders in the member names.

    Labels are line numbers in ``classes.txt`` when the folder has one, else the
    positions of the class names in sorted order.

    Args:
        root: The shard folder.
        split: ``"test"`` reads the shards whose name starts with ``test`` or
            ``val``, ``"train"`` all others, and ``"all"`` every shard.
        transform: Applied to each decoded RGB PIL image.
        max_images: Stop after this many images.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test", "all"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        max_images: int | None = None,
    ) -> None:
        root = Path(root)
        shards = list_shards(root)
        if split == "train":
            shards = [p for p in shards if not is_test_shard(p)]
        elif split == "test":
            shards = [p for p in shards if is_test_shard(p)]
        elif split != "all":
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        if not shards:
            raise ValueError(
                f"{root} has no {split} shards (*.tar, *.tar.gz or *.tgz; test "
                "shards start with test or val)"
            )
        classes_file = root / "classes.txt"
        known = (
            tuple(classes_file.read_text().split()) if classes_file.is_file() else None
        )
        encoded, class_names, names = read_tar_shards(shards, known, max_images)
        classes = known if known is not None else shard_classes(root)
        index = {name: i for i, name in enumerate(classes)}
        labels = np.asarray([index[name] for name in class_names], dtype=np.int64)
        super().__init__(encoded, labels, names, transform, classes)


def shard_classes(root: Path) -> tuple[str, ...]:
    """Return the class names of a shard folder: ``classes.txt`` or all folders.

    Without ``classes.txt`` this lists the members of every shard, without
    extracting them.
    """
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        return tuple(classes_file.read_text().split())
    found: set[str] = set()
    for shard in list_shards(root):
        with tarfile.open(shard, "r:*") as archive:
            for member in archive:
                parts = member.name.strip("/").split("/")
                if member.isfile() and is_image_file(member.name) and len(parts) > 1:
                    found.add(parts[-2])
    return tuple(sorted(found))


class UnlabelledImageFolder(Dataset):
    """The image files directly inside a folder, without labels (label ``-1``).

    Args:
        root: The folder.
        transform: Applied to each RGB PIL image.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.paths = sorted(
            p for p in self.root.iterdir() if p.is_file() and is_image_file(p.name)
        )
        if not self.paths:
            raise ValueError(f"{self.root} has no image files ({IMG_EXTENSIONS})")
        self.transform = transform
        self.classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_rgb(str(self.paths[index]))
        if self.transform is not None:
            return self.transform(image), UNLABELLED
        return image, UNLABELLED

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def with_transform(
        self, transform: Callable[[Image.Image], Any] | None
    ) -> UnlabelledImageFolder:
        """Return a view of the same files with another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other


def describe_item(dataset: Dataset, index: int) -> str:
    """Return the file behind an item of a data set, or its index."""
    describe = getattr(dataset, "describe", None)
    if describe is not None:
        return str(describe(index))
    samples = getattr(dataset, "samples", None)  # torchvision ImageFolder
    if samples is not None:
        return str(samples[index][0])
    return f"item {index}"


class UnreadableImagesError(ValueError, RuntimeError):
    """Too many consecutive images of a data set failed to load.

    A ValueError, so the CLI reports it as invalid input; also a RuntimeError, the
    type that :class:`SkipUnreadable` raised before.
    """

    def __init__(self, message: str) -> None:
        # A DataLoader re-raises a worker's error in the main process as
        # ``type(error)(text)``, where text is the worker's whole traceback
        # (ExceptionWrapper.reraise in torch/_utils.py, torch 2.14). Keep only the
        # original message, which ends that traceback, so the CLI prints one line.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class SkipUnreadable(Dataset):
    """Wrap a file-backed data set so that an unreadable image never stops an epoch.

    When loading item ``i`` raises one of :data:`UNREADABLE_IMAGE_ERRORS` (a
    zero-byte, truncated or malformed file), the wrapper logs a warning, counts the
    skip and returns item ``i + 1`` instead (wrapping around). The count lives in
    shared memory, so skips in data-loader worker processes are counted too, and
    copies made by :meth:`with_dataset` share it.

    Args:
        dataset: The data set to wrap.
        max_attempts: Consecutive unreadable items after which loading fails.
    """

    def __init__(self, dataset: Dataset, max_attempts: int = 10) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.dataset = dataset
        self.max_attempts = max_attempts
        self._skipped = multiprocessing.Value("q", 0)
        self._warnings = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        size = len(self)
        last_error: BaseException | None = None
        for attempt in range(min(self.max_attempts, size)):
            current = (index + attempt) % size
            try:
                return self.dataset[current]
            except UNREADABLE_IMAGE_ERRORS as exc:
                last_error = exc
                self._record_skip(current, exc)
        first = describe_item(self.dataset, index)
        attempts = min(self.max_attempts, size)
        raise UnreadableImagesError(
            f"{attempts} consecutive images, starting at {first}, are unreadable "
            f"(last error: {last_error}); replace or delete the broken files, or "
            "pass a data folder whose images open with PIL"
        ) from last_error

    def _record_skip(self, index: int, error: BaseException) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
        self._warnings += 1
        if self._warnings <= MAX_SKIP_WARNINGS:
            logger.warning(
                "skipping unreadable image %s: %s",
                describe_item(self.dataset, index),
                error,
            )
        if self._warnings == MAX_SKIP_WARNINGS:
            logger.warning(
                "further unreadable images are counted without a warning each"
            )

    @property
    def skipped(self) -> int:
        """Number of unreadable items skipped so far, over all processes."""
        return int(self._skipped.value)

    @property
    def counter_id(self) -> int:
        """Identity of the shared counter, to count copies only once."""
        return id(self._skipped)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(getattr(self.dataset, "classes", ()))

    def with_dataset(self, dataset: Dataset) -> SkipUnreadable:
        """Return a wrapper of another data set that shares this skip counter."""
        other = copy.copy(self)
        other.dataset = dataset
        return other
