"""The ``dcl train`` and ``dcl export`` subcommands.

Importing this module does not import torch: the handlers import the training code
when they run, so ``dcl --help`` and the serving commands stay fast.
"""

from __future__ import annotations

import argparse
import logging
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from training.config import TrainConfig

logger = logging.getLogger(__name__)

# Flags whose names differ from the TrainConfig field they set.
FLAG_NAMES = {"out_dir": "--out"}


def _flag_kwargs(name: str, field: FieldInfo) -> dict[str, Any]:
    """Derive argparse options for one TrainConfig field from its annotation."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))

    default = field.get_default(call_default_factory=False)
    shown = "see config" if field.default_factory is not None else default
    kwargs: dict[str, Any] = {
        "dest": name,
        "default": None,
        "help": f"{field.description} (default: {shown})",
    }
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = list(get_args(annotation))
    else:
        kwargs["type"] = annotation
        kwargs["metavar"] = name.upper()
    return kwargs


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand, with one flag per :class:`TrainConfig` field."""
    parser = subparsers.add_parser(
        "train",
        help="Pretrain an encoder with a contrastive loss.",
        description="Pretrain a ResNet encoder with DCL, DCLW or InfoNCE. Values "
        "come from the defaults, then --config, then the flags. The run folder "
        "gets config.yaml, metrics.jsonl and checkpoint.pt.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="YAML",
        help="YAML or JSON file with TrainConfig fields; flags override it.",
    )
    for name, field in TrainConfig.model_fields.items():
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        parser.add_argument(flag, **_flag_kwargs(name, field))
    parser.set_defaults(func=run_train)
    return parser


def add_export_parser(
    subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="Export a checkpoint as a model bundle (model.onnx + bundle.json).",
        description="Export the encoder of a training checkpoint to ONNX, check "
        "the graph, compare ONNX Runtime with torch on test images, and write the "
        "bundle folder.",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint.pt written by `dcl train`.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="Bundle folder to write; its model.onnx and bundle.json are replaced.",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="Largest accepted absolute difference between the ONNX Runtime and "
        "torch embeddings, per value (default: 1e-4).",
    )
    parser.set_defaults(func=run_export)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Handle ``dcl train``; return the exit status."""
    from training.config import load_config
    from training.trainer import train

    overrides = {name: getattr(args, name) for name in TrainConfig.model_fields}
    try:
        config = load_config(args.config, **overrides)
        result = train(config)
    except ValueError as exc:
        logger.error("dcl train: %s", exc)
        return 2
    logger.info(
        "checkpoint %s: kNN top-1 %.4f after %d epochs",
        result.checkpoint,
        result.knn_top1,
        result.epochs,
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Handle ``dcl export``; return the exit status."""
    from training.export import ExportVerificationError, export_bundle

    try:
        metadata = export_bundle(args.checkpoint, args.out, atol=args.atol)
    except (ValueError, ExportVerificationError) as exc:
        logger.error("dcl export: %s", exc)
        return 2
    logger.info(
        "bundle %s: %s, %d-dimensional embeddings",
        args.out,
        metadata.architecture,
        metadata.embedding_dim,
    )
    return 0
