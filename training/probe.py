"""Evaluation of frozen features: the linear probe, and ``dcl eval`` on any model.

Linear probe recipe (multinomial logistic regression on frozen features):

1. Extract the encoder's features once, in eval mode, with the evaluation
   transform (no augmentation). They are L2-normalised, the same vectors that an
   exported bundle returns.
2. Standardise each feature dimension with the mean and std of the train split.
3. Fit a linear layer with cross-entropy plus an L2 penalty ``λ/2 · ||W||²`` on the
   weights, by full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search,
   at most ``max_iter`` iterations, zero initialisation).
4. Pick λ from a log grid by top-1 on a stratified 10 % validation part of the
   train split, refit on the whole train split, and report top-1 on the test split.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader

from service.bundle import Preprocessing
from training.data import build_labelled_datasets, dataset_name
from training.evaluate import extract_features, knn_accuracy

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
RESULT_NAME = "eval.json"


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        top1: Top-1 accuracy on the test features, in [0, 1].
        weight_decay: The chosen L2 penalty λ.
        validation_top1: Validation top-1 of each λ tried, keyed by ``str(λ)``.
        train_size: Number of train features.
        test_size: Number of test features.
        max_iter: L-BFGS iteration limit per fit.
    """

    top1: float
    weight_decay: float
    validation_top1: dict[str, float] = field(default_factory=dict)
    train_size: int = 0
    test_size: int = 0
    max_iter: int = 0


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean = train.mean(dim=0)
    std = train.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear_classifier(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 100,
) -> nn.Linear:
    """Fit multinomial logistic regression by full-batch L-BFGS.

    Args:
        features: [N, D] float features (standardise them first).
        labels: [N] int class indices in ``[0, num_classes)``.
        num_classes: Number of outputs.
        weight_decay: L2 penalty λ on the weights (not the bias).
        max_iter: L-BFGS iteration limit.

    Returns:
        The fitted layer, on the device of ``features``.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels)
        loss = loss + 0.5 * weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier


@torch.no_grad()
def _top1(classifier: nn.Linear, features: Tensor, labels: Tensor) -> float:
    return float((classifier(features).argmax(dim=1) == labels).float().mean())


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS,
    validation_fraction: float = 0.1,
    max_iter: int = 100,
    seed: int = 0,
) -> LinearProbeResult:
    """Train a linear classifier on frozen train features; report test top-1.

    See the module docstring for the recipe. With one value in ``weight_decays``
    no validation split is made.

    Raises:
        ValueError: the arguments are empty or inconsistent.
    """
    if not weight_decays:
        raise ValueError("weight_decays is empty; pass at least one L2 penalty")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be in (0, 1), got {validation_fraction}"
        )
    if len(train_features) != len(train_labels) or len(test_features) != len(
        test_labels
    ):
        raise ValueError("pass one label per feature row, for train and test")
    if len(train_features) < 2 or len(test_features) < 1:
        raise ValueError(
            f"got {len(train_features)} train and {len(test_features)} test "
            "features; the probe needs at least 2 and 1"
        )
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_x, test_x = _standardise(train_features.float(), test_features.float())

    scores: dict[str, float] = {}
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        fit_idx, val_idx = _validation_split(train_labels, validation_fraction, seed)
        fit_x, val_x = _standardise(
            train_features[fit_idx].float(), train_features[val_idx].float()
        )
        for weight_decay in weight_decays:
            classifier = fit_linear_classifier(
                fit_x, train_labels[fit_idx], num_classes, weight_decay, max_iter
            )
            scores[str(weight_decay)] = _top1(classifier, val_x, train_labels[val_idx])
            logger.info(
                "linear probe: λ=%g gives validation top-1 %.4f",
                weight_decay,
                scores[str(weight_decay)],
            )
        # The first λ with the best score, so ties go to the weakest penalty.
        chosen = max(weight_decays, key=lambda wd: scores[str(wd)])

    classifier = fit_linear_classifier(
        train_x, train_labels, num_classes, chosen, max_iter
    )
    top1 = _top1(classifier, test_x, test_labels)
    logger.info("linear probe: λ=%g, test top-1 %.4f", chosen, top1)
    return LinearProbeResult(
        top1=top1,
        weight_decay=chosen,
        validation_top1=scores,
        train_size=len(train_features),
        test_size=len(test_features),
        max_iter=max_iter,
    )


def _validation_split(
    labels: Tensor, fraction: float, seed: int
) -> tuple[Tensor, Tensor]:
    indices = np.arange(len(labels))
    counts = np.bincount(labels.numpy())
    stratify = labels.numpy() if counts[counts > 0].min() >= 2 else None
    fit_idx, val_idx = train_test_split(
        indices, test_size=fraction, random_state=seed, stratify=stratify
    )
    return torch.as_tensor(fit_idx), torch.as_tensor(val_idx)


@dataclass
class Features:
    """Frozen features of a labelled source's train and test splits."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    model: dict[str, Any]


def checkpoint_features(
    checkpoint_path: str | Path,
    source: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    seed: int = 0,
) -> tuple[Features, str]:
    """Extract torch features of a training checkpoint on a labelled source.

    ``source`` defaults to the checkpoint's training data. Returns the features
    and the source used.
    """
    from training.trainer import (
        load_checkpoint,
        model_from_checkpoint,
        resolve_device,
    )

    checkpoint = load_checkpoint(checkpoint_path)
    source = source or checkpoint["config"]["data"]
    preprocessing = Preprocessing.model_validate(checkpoint["preprocessing"])
    train, test, _ = build_labelled_datasets(source, preprocessing, seed)
    torch_device = resolve_device(device)
    model = model_from_checkpoint(checkpoint).to(torch_device)
    loaders = [
        DataLoader(d, batch_size=batch_size, num_workers=num_workers)
        for d in (train, test)
    ]
    train_x, train_y = extract_features(model, loaders[0], torch_device)
    test_x, test_y = extract_features(model, loaders[1], torch_device)
    info = {
        "checkpoint": str(checkpoint_path),
        "arch": checkpoint["arch"]["arch"],
        "epoch": checkpoint.get("epoch"),
        "backend": f"torch on {torch_device}",
    }
    return Features(train_x, train_y, test_x, test_y, info), source


def _embed_batches(encoder: Any, loader: DataLoader) -> tuple[Tensor, Tensor]:
    features, labels = [], []
    for images, targets in loader:
        features.append(torch.from_numpy(encoder.embed(images.numpy())))
        labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(labels)


def bundle_features(
    bundle_dir: str | Path,
    source: str,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
) -> Features:
    """Extract ONNX Runtime features of a model bundle on a labelled source.

    Images go through the service's own preprocessing
    (``service.preprocess.preprocess_image``) and ``service.encoder.Encoder``, so
    the numbers are those of the deployed model.
    """
    from service.encoder import Encoder
    from service.preprocess import preprocess_image

    encoder = Encoder(bundle_dir)
    preprocessing = encoder.metadata.preprocessing
    transform = functools.partial(preprocess_image, preprocessing=preprocessing)
    train, test, _ = build_labelled_datasets(
        source, preprocessing, seed, transform=transform
    )
    loaders = [
        DataLoader(d, batch_size=batch_size, num_workers=num_workers)
        for d in (train, test)
    ]
    train_x, train_y = _embed_batches(encoder, loaders[0])
    test_x, test_y = _embed_batches(encoder, loaders[1])
    info = {
        "bundle": str(bundle_dir),
        "arch": encoder.metadata.architecture,
        "onnx_sha256": encoder.sha256,
        "backend": f"onnxruntime {encoder.provider}",
    }
    return Features(train_x, train_y, test_x, test_y, info)


def evaluate_features(
    features: Features,
    source: str,
    knn: bool = True,
    linear: bool = True,
    knn_k: int = 200,
    knn_t: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the kNN monitor and the linear probe on extracted features.

    Returns:
        A JSON-ready dict with the model, the data and each evaluation's top-1.
    """
    if not (knn or linear):
        raise ValueError("nothing to evaluate; enable knn, linear or both")
    result: dict[str, Any] = {
        "model": features.model,
        "data": str(source),
        "dataset": dataset_name(source),
        "train_images": len(features.train),
        "test_images": len(features.test),
        "feature_dim": int(features.train.shape[1]),
        "knn": None,
        "linear": None,
    }
    if knn:
        started = time.monotonic()
        top1 = knn_accuracy(
            features.train,
            features.train_labels,
            features.test,
            features.test_labels,
            knn_k,
            knn_t,
        )
        result["knn"] = {
            "top1": top1,
            "k": knn_k,
            "t": knn_t,
            "seconds": round(time.monotonic() - started, 3),
        }
        logger.info("kNN (k=%d, t=%g) top-1 %.4f", knn_k, knn_t, top1)
    if linear:
        started = time.monotonic()
        probe = linear_probe(
            features.train,
            features.train_labels,
            features.test,
            features.test_labels,
            seed=seed,
        )
        result["linear"] = {
            **asdict(probe),
            "recipe": "L2-normalised features, standardised; logistic regression "
            "by full-batch L-BFGS; L2 penalty chosen on 10% of train",
            "seconds": round(time.monotonic() - started, 3),
        }
    return result


def evaluate_model(
    checkpoint: str | Path | None = None,
    bundle: str | Path | None = None,
    source: str | None = None,
    knn: bool = True,
    linear: bool = True,
    knn_k: int = 200,
    knn_t: float = 0.1,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    seed: int = 0,
    out: str | Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate a checkpoint (torch) or a bundle (ONNX Runtime) and write JSON.

    Args:
        checkpoint: ``checkpoint.pt`` of a run; exclusive with ``bundle``.
        bundle: A bundle folder (``model.onnx`` + ``bundle.json``).
        source: Labelled data source; defaults to a checkpoint's training data
            and is required for a bundle.
        out: JSON file to write; defaults to ``eval.json`` beside the checkpoint
            or inside the bundle folder.

    Returns:
        The result dict and the path of the JSON file.

    Raises:
        ValueError: both or neither of ``checkpoint`` and ``bundle`` are given,
            or the data source is missing or unlabelled.
    """
    started = time.monotonic()
    if checkpoint is not None and bundle is None:
        features, source = checkpoint_features(
            checkpoint, source, batch_size, num_workers, device, seed
        )
        default_out = Path(checkpoint).parent / RESULT_NAME
    elif bundle is not None and checkpoint is None:
        if source is None:
            raise ValueError(
                "a bundle does not record where its data is; pass --data SOURCE"
            )
        features = bundle_features(bundle, source, batch_size, num_workers, seed)
        default_out = Path(bundle) / RESULT_NAME
    else:
        raise ValueError("pass exactly one of --checkpoint and --bundle")
    extract_seconds = time.monotonic() - started
    logger.info(
        "extracted %d train and %d test features in %.1f s",
        len(features.train),
        len(features.test),
        extract_seconds,
    )

    result = evaluate_features(features, source, knn, linear, knn_k, knn_t, seed)
    result["extract_seconds"] = round(extract_seconds, 3)
    path = Path(out) if out is not None else default_out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", path)
    return result, path
