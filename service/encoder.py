"""The ONNX Runtime encoder that turns preprocessed images into embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.bundle import MODEL_FILENAME, BundleError, BundleMetadata, load_metadata

logger = logging.getLogger(__name__)

TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

_PREFERENCES = {
    "auto": [CUDA_PROVIDER, CPU_PROVIDER],
    "cpu": [CPU_PROVIDER],
    "cuda": [CUDA_PROVIDER, CPU_PROVIDER],
    "tensorrt": [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER],
}


def choose_providers(preference: str = "auto") -> list[str]:
    """Return the execution providers for ``preference`` that onnxruntime has.

    ``auto`` and ``cuda`` give CUDA then CPU, ``tensorrt`` gives TensorRT, CUDA,
    then CPU, and ``cpu`` gives the CPU only. Providers that this onnxruntime
    build lacks are left out, so the CPU is always the last resort.

    Raises:
        ValueError: ``preference`` is not one of auto, cpu, cuda, tensorrt.
    """
    if preference not in _PREFERENCES:
        raise ValueError(
            f"providers is {preference!r}; use one of {', '.join(_PREFERENCES)}"
        )
    available = set(ort.get_available_providers())
    preferred = _PREFERENCES[preference]
    chosen = [p for p in preferred if p in available or p == CPU_PROVIDER]
    if preference in ("cuda", "tensorrt") and chosen[0] != preferred[0]:
        logger.warning(
            "DCL_PROVIDERS=%s, but this onnxruntime build only has %s; running on "
            "%s. Install the gpu extra (onnxruntime-gpu) to use the GPU",
            preference,
            ", ".join(sorted(available)),
            chosen[0],
        )
    return chosen


class Encoder:
    """An ONNX Runtime session over a verified model bundle.

    ``embed`` is thread-safe: ONNX Runtime allows concurrent ``run`` calls on one
    session, so a request batcher or several threads can share an encoder.

    Args:
        bundle_dir: folder with ``model.onnx`` and ``bundle.json``.
        providers: execution providers in order of preference; by default CUDA
            where available, then CPU.
        intra_op_threads: ONNX Runtime's intra-op thread count; 0 lets it choose.
        intra_op_spinning: whether idle intra-op threads busy-wait for work
            (ONNX Runtime's ``session.intra_op.allow_spinning``). Off by
            default, so that they leave the CPU to request handling.

    Raises:
        BundleError: the bundle is missing or corrupt, or the graph's input,
            output or embedding size differs from ``bundle.json``.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        intra_op_spinning: bool = False,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.metadata: BundleMetadata = load_metadata(self.bundle_dir)
        self.sha256 = self.metadata.onnx_sha256
        self.dim = self.metadata.embedding_dim
        self.image_size = self.metadata.preprocessing.crop_size

        model_path = self.bundle_dir / MODEL_FILENAME
        requested = providers or choose_providers()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if intra_op_spinning else "0"
        )
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=requested
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors.
            raise BundleError(
                f"ONNX Runtime could not load {model_path}: {exc}; export the "
                "bundle again"
            ) from exc
        self.provider: str = self._session.get_providers()[0]
        if self.provider != requested[0]:
            # ONNX Runtime drops a provider whose libraries (CUDA, cuDNN,
            # TensorRT) fail to load, and only logs it at its own level.
            logger.warning(
                "ONNX Runtime could not start %s and fell back to %s; check the "
                "CUDA and cuDNN libraries of the onnxruntime-gpu install",
                requested[0],
                self.provider,
            )
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
