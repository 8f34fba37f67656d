"""Optimizers (SGD, LARS, AdamW) and the per-step learning-rate schedule.

Biases and normalisation parameters get no weight decay with every optimizer, and
LARS leaves them out of its trust-ratio adaptation too, as the LARS of the SimCLR
reference code (google-research/simclr, ``lars_optimizer.py``) does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
OPTIMIZERS = ("sgd", "lars", "adamw")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and an excluded group.

    The excluded group contains every parameter of a normalisation layer and every
    parameter named ``bias``. It gets ``weight_decay=0`` and ``lars_adapt=False``.
    """
    excluded: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or name == "bias":
                excluded[id(parameter)] = parameter
    decayed = [
        p for p in model.parameters() if p.requires_grad and id(p) not in excluded
    ]
    plain = [p for p in excluded.values() if p.requires_grad]
    return [
        {"params": decayed, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": plain, "weight_decay": 0.0, "lars_adapt": False},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (LARS).

    For each parameter tensor ``w`` of a group with ``lars_adapt=True``, the update
    direction ``d = g + λ w`` is scaled by the trust ratio
    ``η ‖w‖ / ‖d‖`` (1 where either norm is 0), then momentum is applied:
    ``v ← μ v + ratio · d`` and ``w ← w − lr · v``. Groups with
    ``lars_adapt=False`` take the plain momentum step. Source: You et al., "Large
    Batch Training of Convolutional Networks", arXiv 1708.03888.

    Args:
        params: Parameters or groups; a group may set ``lars_adapt``.
        lr: Learning rate.
        momentum: μ.
        weight_decay: λ, added to the gradient before the trust ratio.
        eta: η, the trust coefficient.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        for name, value in (("lr", lr), ("eta", eta)):
            if not value > 0:
                raise ValueError(f"LARS {name} must be > 0, got {value}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                direction = parameter.grad
                if group["weight_decay"] != 0:
                    direction = direction.add(parameter, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    weight_norm = torch.linalg.vector_norm(parameter)
                    direction_norm = torch.linalg.vector_norm(direction)
                    ratio = torch.where(
                        (weight_norm > 0) & (direction_norm > 0),
                        group["eta"] * weight_norm / direction_norm,
                        torch.ones_like(weight_norm),
                    )
                    direction = direction * ratio
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = direction.clone()
                else:
                    buffer = state["momentum_buffer"]
                    buffer.mul_(group["momentum"]).add_(direction)
                parameter.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lars_eta: float = 0.001,
) -> torch.optim.Optimizer:
    """Build SGD (with momentum), LARS or AdamW over :func:`parameter_groups`.

    ``momentum`` is used by SGD and LARS, and ``lars_eta`` by LARS only.
    """
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; pass one of {list(OPTIMIZERS)}")


def learning_rate_at(progress: float, base_lr: float, warmup_fraction: float) -> float:
    """Return the LR at a point of the schedule: linear warm-up, then cosine to 0.

    Args:
        progress: Fraction of the schedule done, in [0, 1]; values outside are
            clamped.
        base_lr: Peak learning rate, reached at the end of the warm-up.
        warmup_fraction: Fraction of the schedule spent warming up, in [0, 1).
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return base_lr * progress / warmup_fraction
    decay = (progress - warmup_fraction) / (1.0 - warmup_fraction)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * decay))


def schedule_progress(
    step: int, total_steps: int, elapsed_seconds: float, max_seconds: float | None
) -> float:
    """Return how far the run is through its schedule, by steps or by time.

    The step is measured at its midpoint, so neither the first nor the last step
    gets a learning rate of exactly zero. With a time limit, the larger of the two
    fractions wins, so a run stopped by time still ends its cosine decay.

    NOTE: with a time limit, the LR of each step depends on the machine's speed, so
    such runs are not reproducible step for step.
    """
    progress = (step + 0.5) / total_steps
    if max_seconds is not None:
        progress = max(progress, elapsed_seconds / max_seconds)
    return min(progress, 1.0)


@dataclass
class StepSchedule:
    """The step counter, the LR schedule and the stopping bounds of a run.

    Attributes:
        total_steps: Steps planned by the epoch and step bounds.
        base_lr: Peak learning rate.
        warmup_fraction: Fraction of the schedule spent warming up.
        max_seconds: Time limit of the training loop, or ``None``.
        started: ``time.monotonic()`` when the time limit starts counting; a
            resumed run moves it back by the seconds trained before.
        step: Optimizer steps done.
        agreed_elapsed: Elapsed seconds agreed by all ranks of a data-parallel
            run, so that they use the same LR; ``None`` reads the clock.
    """

    total_steps: int
    base_lr: float
    warmup_fraction: float
    max_seconds: float | None = None
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    agreed_elapsed: float | None = None

    def elapsed(self) -> float:
        if self.agreed_elapsed is not None:
            return self.agreed_elapsed
        return time.monotonic() - self.started

    def current_lr(self) -> float:
        """Return the learning rate for the next step."""
        progress = schedule_progress(
            self.step, self.total_steps, self.elapsed(), self.max_seconds
        )
        return learning_rate_at(progress, self.base_lr, self.warmup_fraction)

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.elapsed() >= self.max_seconds

    def finished(self) -> bool:
        """Return True once the step bound or the time limit is reached."""
        return self.step >= self.total_steps or self.out_of_time()
