"""A small real ONNX encoder and bundle, built without torch, for tests.

Graph: Conv 3x3 (3 -> 8 channels) -> Relu -> AveragePool 4x4 -> Flatten ->
MatMul to ``dim`` -> L2 normalisation. The weights come from a fixed seed, so the
bundle's sha256 is the same on every run with the same onnx version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def make_tiny_model(
    dim: int = 32, image_size: int = 32, seed: int = 0
) -> onnx.ModelProto:
    """Build the encoder graph: ``images`` [N, 3, S, S] -> ``embeddings`` [N, dim]."""
    if image_size % 4 != 0:
        raise ValueError(f"image_size {image_size} must be a multiple of 4")
    rng = np.random.default_rng(seed)
    channels = 8
    pooled = image_size // 4
    flat = channels * pooled * pooled

    initializers = [
        numpy_helper.from_array(
            rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32), "conv_w"
        ),
        numpy_helper.from_array(
            rng.normal(0, 0.1, (channels,)).astype(np.float32), "conv_b"
        ),
        numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(flat), (flat, dim)).astype(np.float32), "proj_w"
        ),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node(
            "Conv", [INPUT_NAME, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node(
            "AveragePool", ["relu"], ["pool"], kernel_shape=[4, 4], strides=[4, 4]
        ),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj_w"], ["features"]),
        helper.make_node("ReduceL2", ["features"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["features", "safe_norm"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["N", 3, image_size, image_size]
            )
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_tiny_bundle(out_dir: Path, dim: int = 32, image_size: int = 32) -> Path:
    """Write ``model.onnx`` and ``bundle.json`` for the tiny encoder into ``out_dir``.

    The preprocessing is CIFAR-style: resize the shorter side to ``image_size``,
    center-crop ``image_size``, normalise with the CIFAR-10 mean and std.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILENAME
    onnx.save(make_tiny_model(dim, image_size), str(model_path))

    metadata = BundleMetadata(
        architecture="tiny-test-cnn",
        cifar_stem=False,
        preprocessing=Preprocessing(
            resize_size=image_size,
            crop_size=image_size,
            interpolation="bilinear",
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
        ),
        embedding_dim=dim,
        training=TrainingProvenance(
            dataset="none (random weights)",
            loss="none",
            temperature=0.1,
            batch_size=1,
            epochs=0,
        ),
        versions={"onnx": onnx.__version__},
        onnx_sha256=sha256_file(model_path),
    )
    write_metadata(out_dir, metadata)
    return out_dir
