import socket

import pytest
import torch

from training.models import (
    ARCHITECTURES,
    EmbeddingModel,
    ProjectionHead,
    ResNetEncoder,
    build_model,
)

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a network connection, e.g. to download weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cifar_stem_shapes_at_32px(arch):
    model = build_model(arch, cifar_stem=True).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        features = model.encode(images)
        projections = model(images)

    assert model.encoder.feature_dim == FEATURE_DIMS[arch]
    assert features.shape == (2, FEATURE_DIMS[arch])
    assert projections.shape == (2, 128)
    assert model.encoder.net.conv1.kernel_size == (3, 3)
    assert model.encoder.net.conv1.stride == (1, 1)
    assert isinstance(model.encoder.net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_imagenet_stem_shapes_at_64px(arch):
    model = build_model(arch, cifar_stem=False, proj_dim=32).eval()

    with torch.no_grad():
        projections = model(torch.randn(2, 3, 64, 64))

    assert projections.shape == (2, 32)
    assert model.encoder.net.conv1.kernel_size == (7, 7)
    assert isinstance(model.encoder.net.maxpool, torch.nn.MaxPool2d)


def test_imagenet_stem_at_224px():
    encoder = ResNetEncoder("resnet18").eval()

    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 224, 224))

    assert features.shape == (1, 512)


def test_head_hidden_width_defaults_to_features():
    model = build_model("resnet50", cifar_stem=True)

    assert model.head.layers[0].in_features == 2048
    assert model.head.layers[0].out_features == 2048
    assert isinstance(model.head.layers[1], torch.nn.BatchNorm1d)
    assert model.head.layers[3].out_features == 128


def test_head_hidden_width_override():
    model = build_model("resnet18", proj_hidden_dim=256, proj_dim=64)

    assert model.head.layers[0].out_features == 256
    assert model.head.layers[3].out_features == 64


def test_embedding_model_normalises_features():
    encoder = ResNetEncoder("resnet18", cifar_stem=True).eval()
    model = EmbeddingModel(encoder)
    images = torch.randn(3, 3, 32, 32)

    with torch.no_grad():
        embeddings = model(images)
        features = encoder(images)

    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(
        embeddings, features / features.norm(dim=1, keepdim=True)
    )


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="resnet101"):
        ResNetEncoder("resnet101")


def test_projection_head_rejects_zero_width():
    with pytest.raises(ValueError, match="hidden_dim"):
        ProjectionHead(512, 0)
