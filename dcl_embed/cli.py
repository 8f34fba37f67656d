"""The ``dcl`` command and its subcommands.

Each side of the project registers its own subcommands; the modules that do so import
nothing heavy, so ``dcl serve`` works where torch is not installed and ``dcl --help``
stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dcl_embed import demo
from service import cli as service_cli
from training import cli as training_cli

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcl",
        description=(
            "Pretrain image encoders with Decoupled Contrastive Learning, export them "
            "to ONNX, and serve embeddings and similarity search."
        ),
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging level for the whole run (default: $DCL_LOG_LEVEL, else INFO).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    training_cli.add_train_parser(subparsers)
    training_cli.add_eval_parser(subparsers)
    training_cli.add_export_parser(subparsers)
    training_cli.add_plot_parser(subparsers)
    service_cli.add_index_parser(subparsers)
    service_cli.add_serve_parser(subparsers)
    demo.add_demo_parser(subparsers)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The ONNX exporter reports each graph-optimisation pass at INFO.
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level or os.environ.get("DCL_LOG_LEVEL", "INFO"))
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name in {"torch", "torchvision", "onnx", "sklearn", "matplotlib"}:
            logger.error(
                "`dcl %s` needs %s, which is not installed; install the training "
                "extra with `pip install 'dcl-embed[train]'`",
                args.command,
                exc.name,
            )
            return 2
        raise
    except (ValueError, OSError) as exc:
        # Bad input from the user, or a path that cannot be used: the message
        # names the value, so a traceback would only bury it. Run with
        # --log-level DEBUG to see one.
        logger.debug("traceback", exc_info=True)
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
