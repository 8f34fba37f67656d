"""The ``dcl train``, ``dcl eval``, ``dcl export`` and ``dcl plot`` subcommands.

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
        _check_out_dir_is_new(config)
        result = train(config)
    except ValueError as exc:
        logger.error("dcl train: %s", exc)
        return 2
    except FloatingPointError as exc:
        # Raised by the training step when the loss is NaN or infinite.
        logger.error("dcl train: %s", exc)
        return 2
    knn = f"{result.knn_top1:.4f}" if result.knn_top1 is not None else "skipped"
    logger.info(
        "checkpoint %s: kNN top-1 %s after %d epochs",
        result.checkpoint,
        knn,
        result.epochs,
    )
    return 0


def _check_out_dir_is_new(config: TrainConfig) -> None:
    """Raise ValueError if a new run would overwrite the run in ``config.out_dir``."""
    from training.checkpoint import CHECKPOINT_NAME

    if config.resume is not None:
        return
    out_dir = Path(config.out_dir)
    if (out_dir / CHECKPOINT_NAME).is_file():
        raise ValueError(
            f"{out_dir} already contains a run ({CHECKPOINT_NAME}); pass "
            f"`--resume {out_dir}` to continue it, or a new --out folder"
        )


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


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate frozen features of a checkpoint or a bundle: kNN and a "
        "linear probe.",
        description="Extract features of a labelled data source once, then report "
        "weighted kNN top-1 and linear-probe top-1 on its test split. A checkpoint "
        "runs in torch; a bundle runs in ONNX Runtime with the service's "
        "preprocessing. Without --knn and --linear, both run. The result is "
        "written as JSON.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint", type=Path, help="checkpoint.pt written by `dcl train`."
    )
    model.add_argument(
        "--bundle", type=Path, help="Bundle folder (model.onnx + bundle.json)."
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="Labelled data source (same layouts as `dcl train --data`); default: "
        "the checkpoint's training data. Required with --bundle.",
    )
    parser.add_argument("--knn", action="store_true", help="Run the kNN evaluation.")
    parser.add_argument(
        "--linear", action="store_true", help="Run the linear probe (L-BFGS)."
    )
    parser.add_argument(
        "--knn-k", type=int, default=200, help="Neighbours of the kNN vote (200)."
    )
    parser.add_argument(
        "--knn-t", type=float, default=0.1, help="Temperature of the kNN vote (0.1)."
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="Images per forward pass (256)."
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="Data-loading processes (2)."
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="Device of a checkpoint's model (auto).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the data and probe splits (0)."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default: eval.json beside the checkpoint or in "
        "the bundle folder).",
    )
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Handle ``dcl eval``; return the exit status."""
    from service.bundle import BundleError
    from training.probe import evaluate_model

    both = not (args.knn or args.linear)
    try:
        result, path = evaluate_model(
            checkpoint=args.checkpoint,
            bundle=args.bundle,
            source=args.data,
            knn=args.knn or both,
            linear=args.linear or both,
            knn_k=args.knn_k,
            knn_t=args.knn_t,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            seed=args.seed,
            out=args.out,
        )
    except (ValueError, BundleError) as exc:
        logger.error("dcl eval: %s", exc)
        return 2
    for name in ("knn", "linear"):
        if result[name] is not None:
            logger.info("%s top-1: %.4f", name, result[name]["top1"])
    logger.info("result written to %s", path)
    return 0


def add_plot_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand."""
    parser = subparsers.add_parser(
        "plot",
        help="Draw loss and kNN-accuracy curves of runs into a PNG.",
        description="Read metrics.jsonl (and steps.jsonl where present) of each "
        "run folder and draw the training loss and the kNN top-1 against the step.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--out", type=Path, default=Path("curves.png"), help="PNG to write."
    )
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        dest="labels",
        help="Legend entry of a run, once per run in order (default: folder names).",
    )
    parser.set_defaults(func=run_plot)
    return parser


def run_plot(args: argparse.Namespace) -> int:
    """Handle ``dcl plot``; return the exit status."""
    from training.plot import plot_runs

    try:
        path = plot_runs(args.run_dirs, args.out, args.labels)
    except ValueError as exc:
        logger.error("dcl plot: %s", exc)
        return 2
    logger.info("curves written to %s", path)
    return 0
