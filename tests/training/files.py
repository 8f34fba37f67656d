"""Small data sets written to disk by the tests."""

import pickle

import numpy as np
from PIL import Image


def write_python_batches(folder, images_per_batch=4):
    """Write a CIFAR-10 python-batches folder with small random batches."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        data = rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=images_per_batch)]
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    return batches


def write_image_folder(root, classes=("cat", "dog"), per_class=10, size=(40, 30)):
    """Write solid-colour PNGs, one sub-folder per class."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (40 * label + i, 100, 200 - 10 * label)
            Image.new("RGB", size, colour).save(root / name / f"{i:03d}.png")
