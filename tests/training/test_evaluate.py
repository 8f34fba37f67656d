import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.evaluate import extract_features, knn_accuracy, knn_predict


def unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


def weighted_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class-0 neighbour at cosine 1 and three class-1 neighbours at 0.6."""
    train = torch.stack(
        [unit(1, 0), unit(0.6, 0.8), unit(0.6, -0.8), unit(0.6, 0.8), unit(-1, 0)]
    )
    labels = torch.tensor([0, 1, 1, 1, 2])
    test = torch.stack([unit(1, 0)])
    return train, labels, test


def test_knn_close_neighbour_outweighs_majority():
    train, labels, test = weighted_case()

    # exp(1 / 0.1) for class 0 beats 3 * exp(0.6 / 0.1) for class 1.
    predicted = knn_predict(train, labels, test, k=4, t=0.1)

    assert predicted.tolist() == [0]


def test_knn_high_temperature_follows_majority():
    train, labels, test = weighted_case()

    # exp(1 / 10) for class 0 loses to 3 * exp(0.6 / 10) for class 1.
    predicted = knn_predict(train, labels, test, k=4, t=10.0)

    assert predicted.tolist() == [1]


def test_knn_uses_only_k_neighbours():
    train, labels, test = weighted_case()

    predicted = knn_predict(train, labels, -test, k=1, t=0.1)

    assert predicted.tolist() == [2]


def test_knn_k_larger_than_memory_bank():
    train, labels, test = weighted_case()

    predicted = knn_predict(train, labels, test, k=200, t=0.1)

    assert predicted.tolist() == [0]


def test_knn_accuracy_counts_correct_fraction():
    train = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    test = torch.eye(3)[[0, 1, 2, 0]]
    test_labels = torch.tensor([0, 1, 0, 1])

    accuracy = knn_accuracy(train, labels, test, test_labels, k=1, t=0.1)

    assert accuracy == pytest.approx(0.5)


def test_knn_chunks_agree_with_one_pass():
    generator = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator))
    labels = torch.randint(0, 4, (50,), generator=generator)
    test = torch.nn.functional.normalize(torch.randn(33, 8, generator=generator))

    whole = knn_predict(train, labels, test, k=7, chunk_size=1000)
    chunked = knn_predict(train, labels, test, k=7, chunk_size=5)

    assert torch.equal(whole, chunked)


def test_knn_rejects_bad_arguments():
    train, labels, test = weighted_case()

    with pytest.raises(ValueError, match="k must"):
        knn_predict(train, labels, test, k=0)
    with pytest.raises(ValueError, match="t must"):
        knn_predict(train, labels, test, t=0)
    with pytest.raises(ValueError, match="one label per feature"):
        knn_predict(train, labels[:2], test)


def test_extract_features_normalises_and_restores_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.train()
    data = TensorDataset(torch.randn(10, 4), torch.arange(10))

    features, labels = extract_features(model, DataLoader(data, batch_size=4), "cpu")

    assert features.shape == (10, 3)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))
    assert labels.tolist() == list(range(10))
    assert model.training
