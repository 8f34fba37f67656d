import math

import pytest
import torch
import torch.nn.functional as F

from tests.training.files import write_image_folder
from training.config import TrainConfig
from training.losses import DCLLoss, build_loss
from training.nnclr import NearestNeighbourLoss, SupportSet
from training.trainer import load_checkpoint, train


def test_support_set_is_fifo():
    support = SupportSet(size=4, dim=2)
    assert len(support) == 0

    support.enqueue(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    assert len(support) == 3
    support.enqueue(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))

    # The fifth row replaced the oldest; all rows are unit length.
    assert len(support) == 4
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(support.rows, expected)
    assert int(support.position) == 1


def test_support_set_keeps_newest_of_large_batch():
    support = SupportSet(size=2, dim=2)
    support.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))

    assert len(support) == 2
    torch.testing.assert_close(support.rows, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))


def test_support_set_skips_non_finite_rows():
    support = SupportSet(size=4, dim=2)
    support.enqueue(torch.tensor([[float("inf"), 0.0]]))

    assert len(support) == 0


def test_nearest_picks_most_similar_filled_row():
    support = SupportSet(size=8, dim=2)
    support.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    queries = torch.tensor([[5.0, 0.5], [0.1, 3.0], [-2.0, -1.5], [0.0, -1.0]])

    neighbours = support.nearest(queries)

    diagonal = -1 / math.sqrt(2)
    expected = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [diagonal, diagonal], [diagonal, diagonal]]
    )
    torch.testing.assert_close(neighbours, expected)


def test_nearest_ignores_unfilled_rows():
    support = SupportSet(size=8, dim=2)
    support.enqueue(torch.tensor([[1.0, 0.0]]))

    # The zero rows not yet filled would score 0 > -1 if they were searched.
    torch.testing.assert_close(
        support.nearest(torch.tensor([[-1.0, 0.0]])), torch.tensor([[1.0, 0.0]])
    )
    with pytest.raises(ValueError, match="empty"):
        SupportSet(size=2, dim=2).nearest(torch.ones(1, 2))


def test_nnclr_first_step_equals_base_loss():
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=generator)
    z2 = torch.randn(6, 4, generator=generator)
    loss = NearestNeighbourLoss(DCLLoss(0.1), support_size=32, dim=4)

    first = loss(z1, z2)

    torch.testing.assert_close(first, DCLLoss(0.1)(z1, z2))
    assert len(loss.support) == 6


def test_nnclr_positive_is_neighbour_of_other_view():
    generator = torch.Generator().manual_seed(1)
    z1 = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    z2 = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    past = torch.randn(12, 4, generator=generator)
    loss = NearestNeighbourLoss(DCLLoss(0.2), support_size=32, dim=4)
    loss.support.enqueue(past)

    value = loss(z1, z2)

    # Loop reference: anchor z1_i, positive NN(z2_i); DCL's 2N - 2 negatives.
    unit_past = F.normalize(past.double(), dim=1)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    rows = torch.cat([a, b])
    total = 0.0
    for i in range(10):
        other = b[i] if i < 5 else a[i - 5]
        neighbour = unit_past[(unit_past @ other).argmax()]
        positive = float(rows[i] @ neighbour) / 0.2
        negatives = [
            float(rows[i] @ rows[m]) / 0.2
            for m in range(10)
            if m not in (i, (i + 5) % 10)
        ]
        total += -positive + math.log(sum(math.exp(n) for n in negatives))
    assert value.item() == pytest.approx(total / 10, rel=1e-5)
    assert len(loss.support) == 17


def test_nnclr_loss_is_finite_with_gradient():
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(8, 16, generator=generator, requires_grad=True)
    z2 = torch.randn(8, 16, generator=generator, requires_grad=True)
    loss = NearestNeighbourLoss(build_loss("dclw"), support_size=16, dim=16)
    loss.support.enqueue(torch.randn(16, 16, generator=generator))

    value = loss(z1, z2)
    value.backward()

    assert torch.isfinite(value)
    assert torch.isfinite(z1.grad).all()
    assert z1.grad.abs().sum() > 0


def test_nnclr_training_steps_run(tmp_path):
    data = tmp_path / "images"
    write_image_folder(data / "train", per_class=6, size=(12, 12))
    write_image_folder(data / "test", per_class=2, size=(12, 12))
    config = TrainConfig(
        data=str(data),
        method="nnclr",
        support_size=10,
        image_size=8,
        batch_size=4,
        epochs=1,
        warmup_epochs=0,
        num_workers=0,
        proj_hidden_dim=16,
        proj_dim=8,
        knn_k=3,
        device="cpu",
        out_dir=tmp_path / "run",
    )

    result = train(config)

    checkpoint = load_checkpoint(result.checkpoint)
    assert result.steps == 3
    assert math.isfinite(result.history[0]["loss"])
    # Three steps of four first-view rows, in a support set of ten.
    assert int(checkpoint["loss"]["support.filled"]) == 10
    assert int(checkpoint["loss"]["support.position"]) == 2
