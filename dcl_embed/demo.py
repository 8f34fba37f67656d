"""``dcl demo``: train, export, index and serve in one command.

With no arguments the demo pretrains a DCL encoder on scikit-learn's bundled
handwritten digits for a bounded time, exports it, indexes the digits as a gallery
and serves search on 127.0.0.1. With ``--data DIR`` it does the same on the user's
images. Every step writes into one work folder and is skipped on the next run when
its output is already there, so a second run starts serving within seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MINUTES = 4.0
# Small enough for several epochs in a few CPU minutes; DCL needs no large batch.
DEMO_BATCH_SIZE = 128
# A mirrored digit or a crop of a fifth of one is often another digit, so the
# digits get larger crops and no flips.
DIGITS_AUGMENTATION = {"crop_min_scale": 0.5, "horizontal_flip": False}
GALLERY_DONE = "indexed.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_workdir(data: str | None) -> Path:
    """Pick the work folder: one per data source under ``$DCL_HOME``."""
    home = Path(os.environ.get("DCL_HOME", "~/.cache/dcl-embed")).expanduser()
    if data is None:
        return home / "demo-digits"
    source = Path(data).expanduser().resolve()
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return home / f"demo-{source.name or 'data'}-{digest}"


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Train, export, index and serve in one command.",
        description=(
            "Pretrain a DCL encoder (on the bundled handwritten digits unless --data "
            "is given), export it, index the images and serve search. Steps whose "
            "output already exists in the work folder are skipped."
        ),
    )
    parser.add_argument(
        "--data",
        default=None,
        help=(
            "Folder of your images: one sub-folder per class, or images anywhere "
            "below it. Default: scikit-learn's 1,797 handwritten digits."
        ),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Folder for the run, bundle and index (default: under $DCL_HOME, "
        "which defaults to ~/.cache/dcl-embed).",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"Training time budget in minutes (default: {DEFAULT_MINUTES}).",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=200,
        help="Maximum training epochs; the time budget usually stops training "
        "first (default: 200).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to serve on.")
    parser.add_argument(
        "--no-serve",
        action="store_true",
        help="Stop after indexing instead of starting the server.",
    )
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir or default_workdir(args.data)
    workdir.mkdir(parents=True, exist_ok=True)
    logger.info("demo work folder: %s", workdir)

    bundle_dir = workdir / "bundle"
    index_dir = workdir / "index"
    if args.data is None:
        gallery = write_digits_gallery(workdir / "gallery")
        data_source = "digits"
    else:
        gallery = Path(args.data).expanduser().resolve()
        if not gallery.is_dir():
            raise FileNotFoundError(
                f"--data {args.data} is not a folder; pass a folder of images"
            )
        data_source = str(gallery)

    example = first_image(gallery)
    ensure_bundle(workdir / "run", bundle_dir, data_source, args.minutes, args.epochs)
    ensure_index(bundle_dir, index_dir, gallery)

    url = f"http://{args.host}:{args.port}"
    logger.info("demo page: %s/ (API docs at %s/docs)", url, url)
    logger.info("example query: curl -s -F image=@%s -F k=5 %s/v1/search", example, url)
    if args.no_serve:
        return 0

    from service.server import run as run_server
    from service.settings import Settings

    settings = Settings(
        bundle_dir=bundle_dir, data_dir=index_dir, host=args.host, port=args.port
    )
    run_server(settings)
    return 0


def write_digits_gallery(gallery: Path) -> Path:
    """Write the bundled digits as PNG files, one folder per digit, once."""
    done = gallery.parent / "gallery.complete"
    if done.exists():
        return gallery

    from PIL import Image

    from training.data import load_digits_images

    splits = load_digits_images()
    count = 0
    for split, (images, labels) in splits.items():
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            folder = gallery / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{split}-{index:04d}.png")
            count += 1
    done.touch()
    logger.info("wrote %d digit images to %s", count, gallery)
    return gallery


def ensure_bundle(
    run_dir: Path, bundle_dir: Path, data: str, minutes: float, epochs: int
) -> None:
    """Train and export unless a valid bundle is already in ``bundle_dir``."""
    from service.bundle import BundleError, load_metadata

    try:
        metadata = load_metadata(bundle_dir)
        logger.info(
            "reusing bundle %s (kNN top-1 %s)", bundle_dir, metadata.training.knn_top1
        )
        return
    except BundleError:
        pass

    from training.config import TrainConfig
    from training.export import export_bundle
    from training.trainer import train

    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        logger.info("reusing checkpoint %s", checkpoint)
    else:
        config = TrainConfig(
            data=data,
            out_dir=run_dir,
            epochs=epochs,
            max_minutes=minutes,
            batch_size=DEMO_BATCH_SIZE,
            # The digits are 8x8 pixels at source, so 16 px loses nothing and
            # has a quarter of the pixels of 32 px to train on.
            image_size=16 if data == "digits" else 32,
            num_workers=0,
            **(DIGITS_AUGMENTATION if data == "digits" else {}),
        )
        result = train(config)
        checkpoint = result.checkpoint
    export_bundle(checkpoint, bundle_dir)


def ensure_index(bundle_dir: Path, index_dir: Path, gallery: Path) -> None:
    """Index the gallery unless it was indexed with this same bundle before."""
    from service.bundle import load_metadata
    from service.indexing import index_folder

    sha = load_metadata(bundle_dir).onnx_sha256
    marker = index_dir / GALLERY_DONE
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded == {"bundle_sha256": sha, "gallery": str(gallery)}:
            logger.info("reusing index in %s", index_dir)
            return
    if index_dir.exists():
        # The demo owns this folder. Its vectors came from another bundle or
        # gallery, and one index never mixes two models, so start it again.
        logger.warning("index in %s is out of date; rebuilding it", index_dir)
        shutil.rmtree(index_dir)

    index_folder(bundle_dir, index_dir, gallery)
    marker.write_text(json.dumps({"bundle_sha256": sha, "gallery": str(gallery)}))


def first_image(folder: Path) -> Path:
    """Return the first image file below ``folder``, for the example query."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            return path
    raise FileNotFoundError(
        f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}; "
        "pass a folder of images with --data"
    )
