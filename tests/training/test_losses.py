import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    LOSSES,
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    build_loss,
    contrastive_logits,
    dclw_weights,
)


def reference_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    name: str,
    temperature: float,
    sigma: float = 0.5,
) -> float:
    """Compute a loss anchor by anchor with Python loops, straight from the formulas."""
    n = z1.shape[0]
    a = F.normalize(z1.double(), dim=1)
    b = F.normalize(z2.double(), dim=1)
    rows = [a[i] for i in range(n)] + [b[i] for i in range(n)]

    weights = [1.0] * n
    if name == "dclw":
        scores = [float(a[i] @ b[i]) / sigma for i in range(n)]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        weights = [2.0 - n * e / sum(exps) for e in exps]

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        positive = float(rows[i] @ rows[j]) / temperature
        negatives = [
            float(rows[i] @ rows[m]) / temperature
            for m in range(2 * n)
            if m not in (i, j)
        ]
        terms = negatives + [positive] if name == "infonce" else negatives
        top = max(terms)
        log_denominator = top + math.log(sum(math.exp(t - top) for t in terms))
        total += -weights[i % n] * positive + log_denominator
    return total / (2 * n)


@pytest.mark.parametrize("name", ["infonce", "dcl", "dclw"])
@pytest.mark.parametrize("n,d", [(2, 3), (5, 8), (16, 32)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_loss_matches_loop_reference(name, n, d, temperature):
    generator = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=generator) * 3
    z2 = torch.randn(n, d, generator=generator) * 3
    loss = build_loss(name, temperature=temperature, sigma=0.5)

    actual = loss(z1.double(), z2.double()).item()
    expected = reference_loss(z1, z2, name, temperature)

    assert actual == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_dclw_matches_reference_for_sigma(sigma):
    generator = torch.Generator().manual_seed(7)
    z1 = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    z2 = torch.randn(6, 4, generator=generator, dtype=torch.float64)

    actual = DCLWLoss(temperature=0.2, sigma=sigma)(z1, z2).item()

    assert actual == pytest.approx(reference_loss(z1, z2, "dclw", 0.2, sigma), rel=1e-9)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_symmetric_in_views(name):
    generator = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 16, generator=generator)
    z2 = torch.randn(8, 16, generator=generator)
    loss = build_loss(name)

    assert loss(z1, z2).item() == pytest.approx(loss(z2, z1).item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_ignores_projection_norm(name):
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(8, 16, generator=generator)
    z2 = torch.randn(8, 16, generator=generator)
    loss = build_loss(name)

    assert loss(z1 * 50, z2 * 0.01).item() == pytest.approx(
        loss(z1, z2).item(), rel=1e-5
    )


def test_dcl_is_infonce_without_positive():
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    z2 = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    positive, negatives = contrastive_logits(z1, z2, 0.1)
    # log(e^p + Σ e^n) = log Σ e^n + softplus(p − log Σ e^n), per anchor.
    gap = F.softplus(positive - torch.logsumexp(negatives, dim=1)).mean()

    infonce = InfoNCELoss(0.1)(z1, z2)
    dcl = DCLLoss(0.1)(z1, z2)

    assert infonce.item() == pytest.approx((dcl + gap).item(), rel=1e-12)
    assert dcl.item() < infonce.item()


def test_dclw_weights_have_mean_one():
    generator = torch.Generator().manual_seed(4)
    z1 = torch.randn(10, 5, generator=generator)
    z2 = torch.randn(10, 5, generator=generator, requires_grad=True)

    weights = dclw_weights(z1, z2, sigma=0.5)

    assert weights.shape == (10,)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert not weights.requires_grad


def test_dclw_equals_dcl_for_equal_similarities():
    # With every positive pair equally similar, all weights are 1.
    z = torch.eye(4, 8, dtype=torch.float64)

    assert DCLWLoss(0.1, 0.5)(z, z).item() == pytest.approx(
        DCLLoss(0.1)(z, z).item(), rel=1e-12
    )


def test_extra_negatives_enter_denominator():
    generator = torch.Generator().manual_seed(5)
    z1 = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    z2 = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    extra = torch.randn(3, 6, generator=generator, dtype=torch.float64)

    positive, negatives = contrastive_logits(z1, z2, 0.1, extra_negatives=extra)

    assert negatives.shape == (8, 11)
    assert torch.isinf(negatives).sum().item() == 16  # self and positive per row
    expected = F.normalize(z1[0], dim=0) @ F.normalize(extra[2], dim=0) / 0.1
    assert negatives[0, 10].item() == pytest.approx(expected.item(), rel=1e-12)
    assert DCLLoss(0.1)(z1, z2, extra).item() > DCLLoss(0.1)(z1, z2).item()


EXTREME_CASES = {
    "small_temperature": (torch.randn(8, 16), torch.randn(8, 16), 0.01),
    "identical_rows": (torch.ones(8, 16), torch.ones(8, 16), 0.1),
    "large_norms": (torch.randn(8, 16) * 1e4, torch.randn(8, 16) * 1e4, 0.01),
    "equal_views": (torch.eye(8, 16), torch.eye(8, 16), 0.01),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("case", sorted(EXTREME_CASES))
def test_loss_finite_at_extremes(name, case):
    z1, z2, temperature = EXTREME_CASES[case]
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)

    loss = build_loss(name, temperature=temperature)(z1, z2)
    loss.backward()

    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all()
    assert torch.isfinite(z2.grad).all()


@pytest.mark.parametrize("name", ["infonce", "dcl"])
def test_loss_passes_gradcheck(name):
    generator = torch.Generator().manual_seed(6)
    z1 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    z2 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    loss = build_loss(name, temperature=0.3)

    assert torch.autograd.gradcheck(
        loss, (z1.requires_grad_(True), z2.requires_grad_(True))
    )


def test_dclw_gradient_treats_weights_as_constants():
    generator = torch.Generator().manual_seed(6)
    z1 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    z2 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    weights = dclw_weights(z1, z2, sigma=0.5).repeat(2)

    def fixed_weight_loss(a, b):
        positive, negatives = contrastive_logits(a, b, 0.3)
        return (torch.logsumexp(negatives, dim=1) - weights * positive).mean()

    inputs = (z1.requires_grad_(True), z2.requires_grad_(True))
    # The finite differences hold the weights fixed, as the loss's gradient does.
    assert torch.autograd.gradcheck(fixed_weight_loss, inputs)
    expected = torch.autograd.grad(fixed_weight_loss(*inputs), inputs)
    actual = torch.autograd.grad(DCLWLoss(0.3, 0.5)(*inputs), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_under_sgd(name):
    torch.manual_seed(0)
    projector = torch.nn.Linear(8, 16)
    optimizer = torch.optim.SGD(projector.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(8)
    images = torch.randn(32, 8, generator=generator)
    view1 = images + 0.1 * torch.randn(32, 8, generator=generator)
    view2 = images + 0.1 * torch.randn(32, 8, generator=generator)
    loss_fn = build_loss(name, temperature=0.2)

    losses = []
    for _ in range(30):
        loss = loss_fn(projector(view1), projector(view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: InfoNCELoss(temperature=0), "temperature"),
        (lambda: DCLLoss(temperature=-0.1), "temperature"),
        (lambda: DCLWLoss(temperature=0.1, sigma=0), "sigma"),
        (lambda: build_loss("nt-xent"), "unknown loss"),
    ],
)
def test_invalid_loss_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "z1, z2, message",
    [
        (torch.randn(1, 4), torch.randn(1, 4), "at least 2"),
        (torch.randn(4, 3), torch.randn(4, 5), "same shape"),
        (torch.randn(4, 3), torch.randn(5, 3), "same shape"),
        (torch.randn(4, 3, 2), torch.randn(4, 3, 2), "2-D"),
        (torch.randn(4), torch.randn(4), "2-D"),
    ],
)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_invalid_batch_raises(name, z1, z2, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name)(z1, z2)
