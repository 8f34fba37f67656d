"""Feature extraction and the weighted kNN monitor.

The monitor follows Wu et al., "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", CVPR 2018: each test image takes its k most
cosine-similar training images, each neighbour votes for its class with weight
exp(similarity / t), and the class with the largest total wins.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Run the encoder over a loader in eval mode and collect L2-normalised features.

    Uses ``model.encode`` when the model has it (a ``ContrastiveModel``), else the
    model's ``forward``. The model's train/eval mode is restored afterwards.

    Returns:
        features [N, D] and labels [N], both on the CPU.
    """
    was_training = model.training
    model.eval()
    encode = getattr(model, "encode", model)
    features, labels = [], []
    try:
        for images, targets in loader:
            output = encode(images.to(device, non_blocking=True))
            features.append(F.normalize(output.float(), dim=1).cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Predict a class per test feature with the weighted kNN vote.

    Features are compared by inner product, so pass L2-normalised rows for cosine
    similarity. ``k`` is capped at the number of training features.

    Shape:
        - train_features: [M, D]; train_labels: [M] (int)
        - test_features: [N, D]
        - output: [N] predicted labels
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"got {train_features.shape[0]} training features but "
            f"{train_labels.shape[0]} labels; pass one label per feature"
        )
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])

    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = test_features[start : start + chunk_size]
        similarity, neighbours = (chunk @ train_features.T).topk(k, dim=1)
        weights = (similarity / t).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
) -> float:
    """Return the weighted kNN top-1 accuracy, in [0, 1]."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(
        train_features, train_labels, test_features, k, t, num_classes
    )
    return float((predicted == test_labels).float().mean())


def knn_monitor(
    model: nn.Module,
    memory_loader: DataLoader,
    test_loader: DataLoader,
    device: torch.device | str,
    k: int = 200,
    t: float = 0.1,
) -> float | None:
    """Extract features of the memory bank and the test set, and return kNN top-1.

    Returns ``None``, without running the model, when either set is empty (an
    unlabelled training source without a labelled evaluation source).
    """
    sizes = [len(loader.dataset) for loader in (memory_loader, test_loader)]  # type: ignore[arg-type]
    if min(sizes) == 0:
        return None
    train_features, train_labels = extract_features(model, memory_loader, device)
    test_features, test_labels = extract_features(model, test_loader, device)
    return knn_accuracy(train_features, train_labels, test_features, test_labels, k, t)
