"""The ONNX Runtime encoder that turns preprocessed images into embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.bundle import MODEL_FILENAME, BundleError, BundleMetadata, load_metadata

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def choose_providers() -> list[str]:
    """Return CUDA then CPU where this onnxruntime build has CUDA, else CPU only."""
    available = ort.get_available_providers()
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


class Encoder:
    """An ONNX Runtime session over a verified model bundle.

    ``embed`` is thread-safe: ONNX Runtime allows concurrent ``run`` calls on one
    session, so a request batcher or several threads can share an encoder.

    Args:
        bundle_dir: folder with ``model.onnx`` and ``bundle.json``.
        providers: execution providers in order of preference; by default CUDA
            where available, then CPU.

    Raises:
        BundleError: the bundle is missing or corrupt, or the graph's input,
            output or embedding size differs from ``bundle.json``.
    """

    def __init__(self, bundle_dir: str | Path, providers: list[str] | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.metadata: BundleMetadata = load_metadata(self.bundle_dir)
        self.sha256 = self.metadata.onnx_sha256
        self.dim = self.metadata.embedding_dim
        self.image_size = self.metadata.preprocessing.crop_size

        model_path = self.bundle_dir / MODEL_FILENAME
        try:
            self._session = ort.InferenceSession(
                str(model_path), providers=providers or choose_providers()
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors.
            raise BundleError(
                f"ONNX Runtime could not load {model_path}: {exc}; export the "
                "bundle again"
            ) from exc
        self.provider: str = self._session.get_providers()[0]
        self._check_graph()
        logger.info(
            "Loaded %s (sha256 %s, dim %d) with ONNX Runtime provider %s",
            model_path,
            self.sha256[:12],
            self.dim,
            self.provider,
        )

    def _check_graph(self) -> None:
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        input_names = [i.name for i in inputs]
        output_names = [o.name for o in outputs]
        if input_names != [self.metadata.input_name]:
            raise BundleError(
                f"model inputs are {input_names}, but bundle.json names "
                f"{self.metadata.input_name!r}; export the bundle again"
            )
        if self.metadata.output_name not in output_names:
            raise BundleError(
                f"model outputs are {output_names}, but bundle.json names "
                f"{self.metadata.output_name!r}; export the bundle again"
            )

        # One zero image checks the embedding size and warms the session up.
        probe = np.zeros((1, 3, self.image_size, self.image_size), dtype=np.float32)
        try:
            (out,) = self._session.run(
                [self.metadata.output_name], {self.metadata.input_name: probe}
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors.
            raise BundleError(
                f"the model failed on a 1x3x{self.image_size}x{self.image_size} "
                f"input, the size bundle.json states: {exc}; export the bundle again"
            ) from exc
        if out.shape != (1, self.dim):
            raise BundleError(
                f"the model returns embeddings of shape {list(out.shape)} for one "
                f"image, but bundle.json states embedding_dim {self.dim}; export "
                "the bundle again"
            )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embed a preprocessed batch.

        Args:
            batch: float32 [N, 3, H, W], normalised, H = W = the bundle's crop size.

        Returns:
            float32 [N, D] embeddings, L2-normalised by the graph.
        """
        expected = (3, self.image_size, self.image_size)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"batch has shape {list(batch.shape)}; expected [N, "
                f"{', '.join(map(str, expected))}], from service.preprocess"
            )
        if batch.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (out,) = self._session.run(
            [self.metadata.output_name], {self.metadata.input_name: batch}
        )
        return np.asarray(out, dtype=np.float32)
