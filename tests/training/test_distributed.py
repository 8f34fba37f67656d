"""Data-parallel training with two gloo processes on the CPU."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.config import TrainConfig
from training.distributed import ResumableSampler, gather_with_gradient
from training.losses import build_loss
from training.trainer import load_checkpoint, train

WORLD_SIZE = 2
PER_RANK = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    n = WORLD_SIZE * PER_RANK
    z1 = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    z2 = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    targets = torch.randn(2 * n, 5, generator=generator, dtype=torch.float64)
    return z1, z2, targets


def local_targets(targets: torch.Tensor, rank: int) -> torch.Tensor:
    """Slice the targets of cat(z1, z2) for one rank's anchors cat(z1_r, z2_r)."""
    n = WORLD_SIZE * PER_RANK
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return torch.cat([targets[:n][rows], targets[n:][rows]])


def join_group(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)


def loss_worker(rank: int, port: int, out_dir: str) -> None:
    join_group(rank, port)
    z1, z2, targets = fixed_inputs()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for name in ("infonce", "dcl", "dclw"):
        for with_targets in (False, True):
            a = z1[rows].clone().requires_grad_(True)
            b = z2[rows].clone().requires_grad_(True)
            extra = local_targets(targets, rank) if with_targets else None
            loss = build_loss(name, 0.2, 0.5)(a, b, positive_targets=extra)
            loss.backward()
            results[(name, with_targets)] = (loss.detach(), a.grad, b.grad)

    # A linear projection under DDP: its averaged gradient must be the
    # one-process gradient of the whole batch.
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, dtype=torch.float64)
    model = DistributedDataParallel(layer)
    loss = build_loss("dclw", 0.2, 0.5)(model(z1[rows]), model(z2[rows]))
    loss.backward()
    results["ddp"] = (layer.weight.grad, layer.bias.grad)

    gathered = gather_with_gradient(torch.full((2, 1), float(rank)))
    results["gathered"] = gathered
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of loss_worker on each of two gloo ranks."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(loss_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_two_ranks_match_one_process(ranks):
    z1, z2, targets = fixed_inputs()

    for name in ("infonce", "dcl", "dclw"):
        for with_targets in (False, True):
            a = z1.clone().requires_grad_(True)
            b = z2.clone().requires_grad_(True)
            extra = targets if with_targets else None
            loss = build_loss(name, 0.2, 0.5, gather_distributed=False)(
                a, b, positive_targets=extra
            )
            loss.backward()
            key = (name, with_targets)

            # The global loss is the mean of the ranks' losses.
            mean_loss = sum(r[key][0] for r in ranks) / WORLD_SIZE
            torch.testing.assert_close(mean_loss, loss.detach(), rtol=0, atol=1e-12)
            # Each rank's rows get W times their one-process gradient, which
            # DDP's averaging divides by W again.
            grad1 = torch.cat([r[key][1] for r in ranks]) / WORLD_SIZE
            grad2 = torch.cat([r[key][2] for r in ranks]) / WORLD_SIZE
            torch.testing.assert_close(grad1, a.grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(grad2, b.grad, rtol=0, atol=1e-12)


def test_ddp_gradient_matches_one_process(ranks):
    z1, z2, _ = fixed_inputs()
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, dtype=torch.float64)

    build_loss("dclw", 0.2, 0.5, gather_distributed=False)(
        layer(z1), layer(z2)
    ).backward()

    for rank in ranks:
        torch.testing.assert_close(
            rank["ddp"][0], layer.weight.grad, atol=1e-12, rtol=0
        )
        torch.testing.assert_close(rank["ddp"][1], layer.bias.grad, atol=1e-12, rtol=0)
    expected = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    assert torch.equal(ranks[0]["gathered"], expected)
    assert torch.equal(ranks[1]["gathered"], expected)


def train_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD_SIZE),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    config = TrainConfig(
        data="digits",
        image_size=8,
        batch_size=8,
        epochs=2,
        max_steps=2,
        warmup_epochs=0,
        num_workers=0,
        proj_hidden_dim=16,
        proj_dim=8,
        knn_k=5,
        method="nnclr",
        support_size=64,
        device="cpu",
        out_dir=out_dir,
    )
    result = train(config)
    torch.save({"steps": result.steps, "knn": result.knn_top1}, f"{out_dir}/r{rank}.pt")


def test_two_process_train_writes_checkpoint(tmp_path):
    run_dir = tmp_path / "run"

    mp.spawn(train_worker, args=(free_port(), str(run_dir)), nprocs=WORLD_SIZE)

    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["world_size"] == WORLD_SIZE
    assert checkpoint["step"] == 2
    assert len(checkpoint["rng"]) == WORLD_SIZE
    assert int(checkpoint["loss"]["support.filled"]) == 2 * WORLD_SIZE * 8
    # 2 processes x 8 images: the LR is scaled for a global batch of 16.
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] > 0
    results = [torch.load(run_dir / f"r{rank}.pt") for rank in range(WORLD_SIZE)]
    assert [r["steps"] for r in results] == [2, 2]
    assert 0.0 <= results[0]["knn"] <= 1.0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_sampler_order_and_skip():
    data = list(range(10))
    first = ResumableSampler(data, rank=0, world_size=2, seed=3)
    second = ResumableSampler(data, rank=1, world_size=2, seed=3)
    first.set_epoch(1)
    second.set_epoch(1)
    order0, order1 = list(first), list(second)

    assert len(order0) == 5
    assert sorted(order0 + order1) == data
    first.skip(2)
    assert list(first) == order0[2:]
    assert len(first) == 3
    first.set_epoch(1)
    assert list(first) == order0
    first.set_epoch(2)
    assert list(first) != order0
    with pytest.raises(ValueError, match="cannot skip 6"):
        first.skip(6)
