"""Argument parsing for ``dcl index`` and ``dcl serve``.

Importing this module is cheap: the handlers import the service modules (and
with them onnxruntime and FAISS) only when they run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_index_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``index``: embed a folder of images into a data dir."""
    parser = subparsers.add_parser(
        "index",
        help="Embed a folder of images into a data dir for `dcl serve`.",
        description="Embed every image under IMAGES_DIR (recursively) and add it "
        "to the item store and FAISS index in --data-dir. The item id is the "
        "file's relative path; re-running replaces items instead of duplicating.",
    )
    parser.add_argument(
        "images_dir", type=Path, metavar="IMAGES_DIR", help="Folder of images"
    )
    parser.add_argument(
        "--bundle", type=Path, required=True, help="Model bundle folder"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="Folder for the item store and index snapshots (created if missing)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="Images per ONNX call (default 64)"
    )
    parser.add_argument(
        "--index-kind",
        choices=["exact", "hnsw", "ivfpq", "auto"],
        default=None,
        help="FAISS index kind of the snapshot (default: $DCL_INDEX_KIND, else "
        "exact). Use the kind the server will run, or it rebuilds at start-up.",
    )
    parser.set_defaults(func=_run_index)
    return parser


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve``: the HTTP API. Flags override the ``DCL_`` environment."""
    parser = subparsers.add_parser(
        "serve",
        help="Serve the embedding and search API.",
        description="Serve the HTTP API. Every setting can also come from a DCL_ "
        "environment variable (DCL_BUNDLE_DIR, DCL_DATA_DIR, DCL_MAX_K, ...); "
        "flags take precedence.",
    )
    parser.add_argument(
        "--bundle", type=Path, help="Model bundle folder (env DCL_BUNDLE_DIR)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="Item store and index folder (env DCL_DATA_DIR)"
    )
    parser.add_argument("--host", help="Address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.set_defaults(func=_run_serve)
    return parser


def _run_index(args: argparse.Namespace) -> int:
    from service.bundle import BundleError
    from service.indexing import index_config, index_folder
    from service.server import configure_logging
    from service.settings import Settings
    from service.store import StoreError

    configure_logging("INFO")
    kind = {"index_kind": args.index_kind} if args.index_kind else {}
    try:
        settings = Settings(bundle_dir=args.bundle, data_dir=args.data_dir, **kind)
        report = index_folder(
            args.bundle,
            args.data_dir,
            args.images_dir,
            batch_size=args.batch_size,
            max_image_pixels=settings.max_image_pixels,
            thumbnail_size=settings.thumbnail_size,
            index_config=index_config(settings),
        )
    except (BundleError, StoreError, ValueError) as exc:
        # pydantic's ValidationError is a ValueError too.
        logger.error("dcl index failed: %s", exc)
        return 2
    for path, reason in sorted(report.skipped_files.items()):
        logger.warning("skipped %s: %s", path, reason)
    logger.info(
        "%d added, %d updated, %d skipped; %d items in %s",
        report.added,
        report.updated,
        report.skipped,
        report.total_items,
        args.data_dir,
    )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.bundle import BundleError, load_metadata
    from service.server import run
    from service.settings import Settings

    overrides = {
        "bundle_dir": args.bundle,
        "data_dir": args.data_dir,
        "host": args.host,
        "port": args.port,
        # The top-level `dcl --log-level` flag; None leaves DCL_LOG_LEVEL in force.
        "log_level": getattr(args, "log_level", None),
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        logging.basicConfig()
        logger.error(
            "invalid settings; pass --bundle and --data-dir or set DCL_BUNDLE_DIR "
            "and DCL_DATA_DIR:\n%s",
            exc,
        )
        return 2
    # Check the bundle and the data dir before the server starts, so that a
    # mistake exits with a message instead of a server that is never ready.
    try:
        load_metadata(settings.bundle_dir)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except BundleError as exc:
        logging.basicConfig()
        logger.error("dcl serve: %s", exc)
        return 2
    except OSError as exc:
        logging.basicConfig()
        logger.error(
            "dcl serve: cannot create data dir %s (%s); pass a writable folder "
            "with --data-dir or DCL_DATA_DIR",
            settings.data_dir,
            exc,
        )
        return 2
    run(settings)
    return 0
