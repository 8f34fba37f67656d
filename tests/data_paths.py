"""Where the tests find the real data sets, and small extracts of them.

The data sets live outside the repository, in ``../shared/data`` next to the clone
(``DCL_TEST_DATA`` overrides the location). Tests that need them skip with the reason
when they are absent.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(
    os.environ.get("DCL_TEST_DATA", REPO_ROOT.parent / "shared" / "data")
).resolve()
CIFAR10_DIR = DATA_ROOT / "cifar10"


def require_cifar10() -> Path:
    """Return the CIFAR-10 shard folder, or skip the calling test."""
    if not (CIFAR10_DIR / "test-00000-of-00001.tar.gz").is_file():
        pytest.skip(
            f"CIFAR-10 shards not found in {CIFAR10_DIR}; set DCL_TEST_DATA to the "
            "folder that contains cifar10/"
        )
    return CIFAR10_DIR


def extract_cifar10_subset(
    destination: Path, split: str, per_class: int, shard: str | None = None
) -> Path:
    """Copy the first ``per_class`` JPEGs of each class into an ImageFolder layout.

    The files keep their upstream names, ``<split>/<class>/<NNNN>.jpg``, under
    ``destination``. Returns ``destination / split``.
    """
    source = require_cifar10()
    shard_name = shard or (
        "test-00000-of-00001.tar.gz"
        if split == "test"
        else "train-00000-of-00005.tar.gz"
    )
    copied_per_class: Counter[str] = Counter()
    with tarfile.open(source / shard_name) as archive:
        for member in archive:
            if not member.isfile():
                continue
            class_name = member.name.split("/")[1]
            if copied_per_class[class_name] >= per_class:
                continue
            target = destination / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            extracted = archive.extractfile(member)
            if extracted is None:
                raise ValueError(f"{shard_name}: cannot read member {member.name}")
            target.write_bytes(extracted.read())
            copied_per_class[class_name] += 1
    return destination / split
