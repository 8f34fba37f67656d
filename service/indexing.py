"""Offline indexing of an image folder into a data dir that the server reads."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from service.collection import Collection
from service.encoder import Encoder
from service.preprocess import (
    ImageError,
    decode_image,
    make_thumbnail,
    preprocess_batch,
    set_pixel_limit,
)
from service.store import NewItem

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


@dataclass
class IndexReport:
    """Counts from one ``index_folder`` run.

    ``added`` counts new ids and ``updated`` counts replaced items. ``skipped``
    counts files that could not be read or decoded, and ``skipped_files`` maps
    their relative paths to the reason.
    """

    scanned: int = 0
    added: int = 0
    updated: int = 0
    skipped: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)
    total_items: int = 0
    seconds: float = 0.0


def find_images(images_dir: Path) -> list[Path]:
    """Return the image files under ``images_dir``, recursively, in sorted order."""
    return sorted(
        path
        for path in images_dir.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def index_folder(
    bundle_dir: str | Path,
    data_dir: str | Path,
    images_dir: str | Path,
    batch_size: int = 64,
    max_image_pixels: int = 40_000_000,
    thumbnail_size: int = 96,
) -> IndexReport:
    """Embed every image under ``images_dir`` and upsert it into ``data_dir``.

    An item's id is the file's path relative to ``images_dir`` (with ``/``), and
    its metadata is ``{"path": id, "label": parent folder name}`` (no label for
    files at the top level). Re-running replaces items instead of duplicating
    them. Writes an index snapshot at the end.

    Raises:
        BundleError: the bundle is missing or corrupt.
        StoreError: ``data_dir`` was made with another model.
        ValueError: ``images_dir`` is not a folder or ``batch_size`` < 1.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"images folder {images_dir} not found; pass a folder")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; use 1 or more")

    start = time.perf_counter()
    set_pixel_limit(max_image_pixels)
    encoder = Encoder(bundle_dir)
    collection = Collection(data_dir, encoder.sha256, encoder.dim)
    report = IndexReport()
    try:
        paths = find_images(images_dir)
        report.scanned = len(paths)
        logger.info("Indexing %d images from %s", len(paths), images_dir)
        with tqdm(total=len(paths), unit="img", desc="index") as progress:
            for offset in range(0, len(paths), batch_size):
                chunk = paths[offset : offset + batch_size]
                _index_chunk(
                    chunk,
                    images_dir,
                    encoder,
                    collection,
                    report,
                    max_image_pixels,
                    thumbnail_size,
                )
                progress.update(len(chunk))
        collection.snapshot()
        report.total_items = len(collection)
    finally:
        collection.close()

    report.seconds = time.perf_counter() - start
    logger.info(
        "Indexed %s: %d added, %d updated, %d skipped, %d items in total (%.1f s)",
        images_dir,
        report.added,
        report.updated,
        report.skipped,
        report.total_items,
        report.seconds,
    )
    return report


def _index_chunk(
    paths: list[Path],
    images_dir: Path,
    encoder: Encoder,
    collection: Collection,
    report: IndexReport,
    max_image_pixels: int,
    thumbnail_size: int,
) -> None:
    ids, images, metadata = [], [], []
    for path in paths:
        item_id = path.relative_to(images_dir).as_posix()
        try:
            image = decode_image(path.read_bytes(), max_image_pixels, name=item_id)
        except (ImageError, OSError) as exc:
            report.skipped += 1
            report.skipped_files[item_id] = str(exc)
            logger.warning("Skipped %s: %s", item_id, exc)
            continue
        ids.append(item_id)
        images.append(image)
        entry = {"path": item_id}
        if path.parent != images_dir:
            entry["label"] = path.parent.name
        metadata.append(entry)
    if not images:
        return

    embeddings = encoder.embed(preprocess_batch(images, encoder.metadata.preprocessing))
    items = [
        NewItem(
            id=item_id,
            vector=vector,
            metadata=meta,
            thumbnail=make_thumbnail(image, thumbnail_size),
        )
        for item_id, vector, meta, image in zip(
            ids, embeddings, metadata, images, strict=True
        )
    ]
    for result in collection.upsert(items):
        if result.created:
            report.added += 1
        else:
            report.updated += 1
