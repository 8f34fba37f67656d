"""Getting images into a data dir: folder indexing, re-embedding, start-up.

``index_folder`` embeds a folder of images in batches and resumes after an
interruption. ``reembed_store`` re-embeds every stored item with a new model.
``open_collection`` opens a data dir for the server, re-embedding first when
the settings allow it and the model changed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from service.collection import Collection
from service.encoder import Encoder
from service.index import IndexConfig
from service.preprocess import (
    ImageError,
    decode_image,
    make_thumbnail,
    preprocess_batch,
    set_pixel_limit,
)
from service.settings import Settings
from service.store import (
    FileSource,
    ItemStore,
    NewItem,
    StoreError,
    read_store_model,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


@dataclass
class IndexReport:
    """Counts from one ``index_folder`` run.

    ``added`` counts new ids and ``updated`` counts replaced items.
    ``unchanged`` counts files already stored with the same size and
    modification time, which a resumed run skips without decoding. ``skipped``
    counts files that could not be read or decoded, and ``skipped_files`` maps
    their relative paths to the reason.
    """

    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)
    total_items: int = 0
    seconds: float = 0.0


def find_images(images_dir: Path) -> list[Path]:
    """Return the image files under ``images_dir``, recursively, in sorted order."""
    return sorted(_walk_images(images_dir))


def _walk_images(folder: Path) -> Iterator[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk_images(Path(entry.path))
            elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(entry.path)


def index_folder(
    bundle_dir: str | Path,
    data_dir: str | Path,
    images_dir: str | Path,
    batch_size: int = 64,
    max_image_pixels: int = 40_000_000,
    thumbnail_size: int = 96,
    index_config: IndexConfig | None = None,
) -> IndexReport:
    """Embed every image under ``images_dir`` and upsert it into ``data_dir``.

    An item's id is the file's path relative to ``images_dir`` (with ``/``), and
    its metadata is ``{"path": id, "label": parent folder name}`` (no label for
    files at the top level). The store records each file's absolute path, size
    and modification time. Each batch is committed on its own, so an
    interrupted run keeps its finished batches, and a re-run skips files whose
    size and modification time match the stored ones. Writes an index snapshot
    at the end.

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
    collection = Collection(data_dir, encoder.sha256, encoder.dim, config=index_config)
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
        "Indexed %s: %d added, %d updated, %d unchanged, %d skipped, %d items in "
        "total (%.1f s)",
        images_dir,
        report.added,
        report.updated,
        report.unchanged,
        report.skipped,
        report.total_items,
        report.seconds,
    )
    if report.skipped_files:
        listing = "\n".join(
            f"  {path}: {reason}"
            for path, reason in sorted(report.skipped_files.items())
        )
        logger.warning("Skipped %d unreadable files:\n%s", report.skipped, listing)
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
    ids = [path.relative_to(images_dir).as_posix() for path in paths]
    stored = collection.store.file_sources(ids)

    new_ids, images, metadata, sources = [], [], [], []
    for path, item_id in zip(paths, ids, strict=True):
        try:
            stat = path.stat()
            source = FileSource(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if stored.get(item_id) == source:
                report.unchanged += 1
                continue
            image = decode_image(path.read_bytes(), max_image_pixels, name=item_id)
        except (ImageError, OSError) as exc:
            report.skipped += 1
            report.skipped_files[item_id] = str(exc)
            logger.warning("Skipped %s: %s", item_id, exc)
            continue
        new_ids.append(item_id)
        images.append(image)
        sources.append(source)
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
            source_file=source,
        )
        for item_id, vector, meta, image, source in zip(
            new_ids, embeddings, metadata, images, sources, strict=True
        )
    ]
    for result in collection.upsert(items):
        if result.created:
            report.added += 1
        else:
            report.updated += 1


def reembed_store(
    data_dir: str | Path,
    encoder: Encoder,
    batch_size: int = 64,
    max_image_pixels: int = 40_000_000,
) -> int:
    """Re-embed every item in ``data_dir`` with ``encoder``; return how many.

    Each item is re-embedded from its stored image bytes or its source file.
    The new vectors are committed beside the old ones batch by batch (an
    interrupted run resumes where it stopped), and one final transaction
    switches every vector and the store's model at once, so the store never
    mixes two models. Returns 0 if the store already uses this model.

    Raises:
        StoreError: some items were added by vector, or their source file is
            missing, unreadable or changed since it was indexed; nothing is
            switched then.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; use 1 or more")
    store = ItemStore(data_dir, encoder.sha256, encoder.dim, check_model=False)
    try:
        if store.bundle_sha256 == encoder.sha256:
            return 0
        old_sha256 = store.bundle_sha256
        without_source, examples = store.count_without_source()
        if without_source:
            raise StoreError(
                f"{without_source} items in {store.path} were added by vector "
                f"(for example {examples}), so the model with sha256 "
                f"{encoder.sha256[:12]} cannot re-embed them; delete those items "
                "with the old model, or start with a new data dir"
            )

        total = store.count()
        logger.info(
            "Re-embedding %d items in %s from model %s to model %s",
            total,
            store.path,
            old_sha256[:12],
            encoder.sha256[:12],
        )
        failures: dict[str, str] = {}
        after_key = -1
        with tqdm(total=total, unit="img", desc="re-embed") as progress:
            while rows := store.sources_to_reembed(
                encoder.sha256, after_key, batch_size
            ):
                after_key = rows[-1].key
                keys, images = [], []
                for row in rows:
                    try:
                        data = row.source
                        if data is None:
                            data = Path(str(row.source_path)).read_bytes()
                        images.append(decode_image(data, max_image_pixels, name=row.id))
                    except (ImageError, OSError) as exc:
                        failures[row.id] = str(exc)
                        continue
                    keys.append(row.key)
                if images:
                    batch = preprocess_batch(images, encoder.metadata.preprocessing)
                    store.put_reembedded(encoder.sha256, keys, encoder.embed(batch))
                progress.update(len(rows))
        if failures:
            listing = "; ".join(f"{i}: {r}" for i, r in sorted(failures.items())[:10])
            raise StoreError(
                f"{len(failures)} items in {store.path} could not be re-embedded "
                f"({listing}); restore their source files or delete the items, then "
                "start again (finished items are kept)"
            )
        store.switch_model(encoder.sha256, encoder.dim)
        logger.info(
            "Switched %s to model %s: %d items re-embedded",
            store.path,
            encoder.sha256[:12],
            total,
        )
        return total
    finally:
        store.close()


def index_config(settings: Settings) -> IndexConfig:
    """Return the index configuration in ``settings``."""
    return IndexConfig(
        kind=settings.index_kind,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        ivf_nprobe=settings.ivf_nprobe,
        max_tombstone_fraction=settings.max_tombstone_fraction,
        ivf_rerank_factor=settings.ivf_rerank_factor,
    )


def open_collection(settings: Settings, encoder: Encoder) -> Collection:
    """Open the data dir for ``encoder``'s model and start the snapshot thread.

    When the store was made with another model, re-embeds every item first if
    ``settings.reembed_on_model_change`` is set.

    Raises:
        StoreError: the store was made with another model and re-embedding is
            off, or it is on and some items cannot be re-embedded.
    """
    stored = read_store_model(settings.data_dir)
    if stored is not None and stored[0] != encoder.sha256:
        if not settings.reembed_on_model_change:
            raise StoreError(
                f"{settings.data_dir} contains vectors from the model with sha256 "
                f"{stored[0][:12]}, but the bundle in {settings.bundle_dir} has sha256 "
                f"{encoder.sha256[:12]}; set DCL_REEMBED_ON_MODEL_CHANGE=true to "
                "re-embed every item with the new model, or use a new data dir"
            )
        reembed_store(
            settings.data_dir,
            encoder,
            batch_size=settings.max_batch_size,
            max_image_pixels=settings.max_image_pixels,
        )

    collection = Collection(
        settings.data_dir,
        encoder.sha256,
        encoder.dim,
        config=index_config(settings),
        snapshots_kept=settings.snapshots_kept,
    )
    if collection.snapshot_seq != collection.applied_seq:
        try:
            collection.snapshot()
        except OSError:
            logger.exception("Writing the start-up index snapshot failed; continuing")
    collection.start_background(
        settings.snapshot_every_changes, settings.snapshot_every_seconds
    )
    reason = collection.rebuild_reason()
    if reason is not None:
        collection.start_rebuild(reason)
    return collection
