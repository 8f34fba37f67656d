"""Export a training checkpoint to a model bundle (``model.onnx`` + ``bundle.json``).

The graph is the encoder followed by L2 normalisation, exported with the
``torch.export``-based ONNX exporter (torch >= 2.9 default, which needs
onnxscript) into one file with the weights embedded. Before anything is written to
the bundle folder, the ONNX model is checked with ``onnx.checker`` and its output
is compared with torch's on real images that went through the evaluation
transform.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image

from service.bundle import (
    INPUT_NAME,
    MODEL_FILENAME,
    OUTPUT_NAME,
    BundleMetadata,
    Preprocessing,
    TrainingProvenance,
    sha256_file,
    write_metadata,
)
from training.augment import eval_transform
from training.data import detect_source, load_sample_images
from training.models import EmbeddingModel
from training.trainer import load_checkpoint, model_from_checkpoint

logger = logging.getLogger(__name__)

# Images compared between torch and ONNX Runtime when the caller passes none.
DEFAULT_SAMPLE_COUNT = 8


class ExportVerificationError(RuntimeError):
    """The exported ONNX model is invalid or disagrees with the torch model."""


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _default_sample_images(data_source: str) -> list[Image.Image]:
    """Return test images of the checkpoint's data source, or digits without it."""
    try:
        detect_source(data_source)
    except ValueError:
        logger.warning(
            "data source %r of the checkpoint is not available; checking the "
            "export on scikit-learn digits instead",
            data_source,
        )
        data_source = "digits"
    images = load_sample_images(data_source, DEFAULT_SAMPLE_COUNT)
    if len(images) < 2:
        logger.warning(
            "data source %r has %d test images; checking the export on "
            "scikit-learn digits instead",
            data_source,
            len(images),
        )
        images = load_sample_images("digits", DEFAULT_SAMPLE_COUNT)
    return images


def _export_onnx(model: EmbeddingModel, crop_size: int, path: Path) -> None:
    example = torch.randn(2, 3, crop_size, crop_size)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        dynamic_shapes={"images": {0: batch}},
        # Keep the weights inside model.onnx; the default writes model.onnx.data.
        external_data=False,
        verbose=False,
    )


def _check_single_file(path: Path) -> None:
    """Raise unless the ONNX model is valid and stores every weight inline."""
    model = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    external = [
        tensor.name
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportVerificationError(
            f"{path} keeps {len(external)} weights in external files (first: "
            f"{external[0]}); the bundle needs them inside model.onnx"
        )
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportVerificationError(
            f"{path} has inputs and outputs {names}, expected "
            f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )


def compare_with_onnxruntime(
    model: torch.nn.Module, onnx_path: Path, batches: Sequence[torch.Tensor]
) -> float:
    """Run batches through torch and ONNX Runtime (CPU); return the max abs diff."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = model(batch).numpy()
            (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
            if actual.shape != expected.shape:
                raise ExportVerificationError(
                    f"ONNX Runtime returned shape {actual.shape} for a batch of "
                    f"{batch.shape[0]}, torch returned {expected.shape}"
                )
            diff = float(np.max(np.abs(actual - expected)))
            logger.info("batch of %d: max abs diff %.3g", batch.shape[0], diff)
            worst = max(worst, diff)
    return worst


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    sample_images: list[Image.Image] | None = None,
    atol: float = 1e-4,
) -> BundleMetadata:
    """Export a checkpoint as a model bundle and verify it.

    Args:
        checkpoint: The ``checkpoint.pt`` that :func:`training.trainer.train` wrote.
        out_dir: Bundle folder; ``model.onnx`` and ``bundle.json`` in it are
            replaced.
        sample_images: At least 2 images on which torch and ONNX Runtime are
            compared. By default, the first test images of the checkpoint's data
            source are used, or scikit-learn digits if that source is missing.
        atol: Largest accepted absolute difference between the two embeddings.

    Returns:
        The metadata written to ``bundle.json``.

    Raises:
        ValueError: the checkpoint is missing or invalid, or fewer than 2 sample
            images were passed.
        ExportVerificationError: the ONNX model is invalid, stores weights outside
            ``model.onnx``, or differs from torch by more than ``atol``. Nothing is
            written to ``out_dir`` then.
    """
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    if atol <= 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    state = load_checkpoint(checkpoint)
    config = state["config"]
    preprocessing = Preprocessing.model_validate(state["preprocessing"])
    arch = state["arch"]

    model = EmbeddingModel(model_from_checkpoint(state).encoder).eval()
    if sample_images is None:
        sample_images = _default_sample_images(config["data"])
    if len(sample_images) < 2:
        raise ValueError(
            f"got {len(sample_images)} sample images; pass at least 2, so that a "
            "batch of more than one image is checked"
        )
    transform = eval_transform(preprocessing)
    inputs = torch.stack([transform(image) for image in sample_images])
    batches = [inputs[:1], inputs]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / MODEL_FILENAME
        logger.info("exporting %s to ONNX", checkpoint)
        _export_onnx(model, preprocessing.crop_size, staged)
        _check_single_file(staged)
        extra_files = sorted(p.name for p in Path(tmp).iterdir() if p != staged)
        if extra_files:
            raise ExportVerificationError(
                f"the exporter wrote {extra_files} next to {MODEL_FILENAME}; the "
                "bundle must be a single model file"
            )
        diff = compare_with_onnxruntime(model, staged, batches)
        if diff > atol:
            raise ExportVerificationError(
                f"ONNX Runtime and torch embeddings differ by up to {diff:.3g}, more "
                f"than atol={atol}; the bundle was not written"
            )

        metadata = BundleMetadata(
            architecture=arch["arch"],
            cifar_stem=arch["cifar_stem"],
            preprocessing=preprocessing,
            embedding_dim=arch["feature_dim"],
            # `steps` is an extra field, which TrainingProvenance allows.
            training=TrainingProvenance.model_validate(
                {
                    "dataset": state.get("dataset", config["data"]),
                    "loss": config["loss"],
                    "temperature": config["temperature"],
                    "batch_size": config["batch_size"],
                    "epochs": state["epoch"],
                    "knn_top1": state.get("knn_top1"),
                    "seed": config["seed"],
                    "steps": state.get("step"),
                }
            ),
            versions={
                "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__),
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "dcl-embed": _package_version("dcl-embed"),
            },
            onnx_sha256=sha256_file(staged),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, out_dir / MODEL_FILENAME)
    write_metadata(out_dir, metadata)
    logger.info(
        "wrote bundle %s: %s, %d-dimensional embeddings, max abs diff %.3g",
        out_dir,
        metadata.architecture,
        metadata.embedding_dim,
        diff,
    )
    return metadata
