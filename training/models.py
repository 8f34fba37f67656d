"""ResNet encoders from torchvision, the SimCLR projection head, and export wrappers.

Weights are always built from scratch (``weights=None``), so nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier, returning pooled features.

    Args:
        arch: One of :data:`ARCHITECTURES`.
        cifar_stem: Replace the 7x7 stride-2 ``conv1`` and the max-pool with a 3x3
            stride-1 convolution, as is usual for 32 px images.

    Shape:
        - input: [N, 3, H, W]
        - output: [N, feature_dim], with feature_dim 512 (resnet18, resnet34) or
          2048 (resnet50).
    """

    def __init__(self, arch: str = "resnet18", cifar_stem: bool = False) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {arch!r}; pass one of {sorted(ARCHITECTURES)}"
            )
        net = ARCHITECTURES[arch](weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.feature_dim: int = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.arch = arch
        self.cifar_stem = cifar_stem

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class ProjectionHead(nn.Module):
    """The SimCLR projection head: Linear, BatchNorm, ReLU, Linear.

    Shape:
        - input: [N, in_dim]
        - output: [N, out_dim]
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("hidden_dim", hidden_dim),
            ("out_dim", out_dim),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be a positive size, got {value}")
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class ContrastiveModel(nn.Module):
    """An encoder followed by a projection head.

    ``forward`` returns the projections that the loss consumes; ``encode`` returns
    the encoder's features, which are the embeddings used for retrieval.
    """

    def __init__(self, encoder: ResNetEncoder, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)


def build_model(
    arch: str = "resnet18",
    cifar_stem: bool = False,
    proj_hidden_dim: int | None = None,
    proj_dim: int = 128,
) -> ContrastiveModel:
    """Build a :class:`ContrastiveModel`.

    Args:
        arch: One of :data:`ARCHITECTURES`.
        cifar_stem: Use the 3x3 stride-1 stem without max-pool.
        proj_hidden_dim: Width of the head's hidden layer; ``None`` uses the
            encoder's feature size (512 or 2048).
        proj_dim: Size of the projections that the loss consumes.
    """
    encoder = ResNetEncoder(arch, cifar_stem=cifar_stem)
    hidden = proj_hidden_dim if proj_hidden_dim is not None else encoder.feature_dim
    head = ProjectionHead(encoder.feature_dim, hidden, proj_dim)
    return ContrastiveModel(encoder, head)


class EmbeddingModel(nn.Module):
    """The exported graph: encoder features, L2-normalised.

    Shape:
        - input: [N, 3, H, W], float32, already normalised with the dataset's mean
          and std.
        - output: [N, feature_dim], unit L2 norm per row.
    """

    def __init__(self, encoder: ResNetEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.encoder(images), dim=1)
