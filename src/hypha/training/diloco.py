"""Helpers the DiLoCo trainer and parameter server share.

Owns parameter snapshots and pseudo-gradients (theta_global - theta_local), copying weights
into a model, exact parameter comparison, evaluation without gradients, deterministic
mini-batches over a data slice, and the inner learning-rate schedule. It does not run the
inner/outer loop itself (the trainer session does), talk to the network, or average updates
(``training/outer.py``).

Parameters are always addressed by ``model.named_parameters()`` names, so a tied weight
appears once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from hypha.training.models import batch_loss

logger = logging.getLogger(__name__)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copy the model's parameters to detached CPU float32 tensors, by name."""
    return {
        name: param.detach().to("cpu", torch.float32, copy=True)  # [*shape]
        for name, param in model.named_parameters()
    }


def _check_keys(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    expected_set, got_set = set(expected), set(got)
    if expected_set != got_set:
        raise ValueError(
            f"{what}: missing {sorted(expected_set - got_set)}, unexpected {sorted(got_set - expected_set)}"
        )


def pseudo_gradient(global_params: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Return the DiLoCo pseudo-gradient theta_global - theta_local as CPU float32 tensors.

    Args:
        global_params: The weights the round started from (e.g. a ``snapshot``).
        model: The model after its inner steps.

    Raises:
        ValueError: If the names or shapes differ.
    """
    local = dict(model.named_parameters())
    _check_keys(global_params.keys(), local.keys(), "pseudo_gradient")
    delta: dict[str, Tensor] = {}
    for name, param in local.items():
        start = global_params[name].detach().to("cpu", torch.float32)  # [*shape]
        if start.shape != param.shape:
            raise ValueError(f"pseudo_gradient: {name!r} shape {tuple(start.shape)} != model")
        delta[name] = start - param.detach().to("cpu", torch.float32)  # [*shape]
    return delta


@torch.no_grad()
def load_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` into the model's parameters in place (any device or dtype).

    Optimizers keep pointing at the same parameter tensors, so their state survives.

    Raises:
        ValueError: If the names or shapes differ.
    """
    local = dict(model.named_parameters())
    _check_keys(local.keys(), params.keys(), "load_params")
    for name, param in local.items():
        source = params[name]
        if source.shape != param.shape:
            raise ValueError(f"load_params: {name!r} shape {tuple(source.shape)} != model")
        param.copy_(source)  # [*shape], cast and moved by copy_


def params_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor], atol: float = 0.0) -> bool:
    """Whether two parameter dicts have the same names, shapes and values.

    Values are compared in float32 on the CPU; ``atol=0`` asks for exact equality.
    """
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            return False
        diff = (x.detach().cpu().float() - y.detach().cpu().float()).abs()  # [*shape]
        if diff.numel() and not bool((diff <= atol).all()):
            return False
    return True


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_batches: int | None = None
) -> float:
    """Mean loss over ``batches``, weighted by batch size, without gradients.

    The model runs in eval mode and goes back to its previous mode afterwards.

    Args:
        model: A built-in or Hugging Face model (see ``models.batch_loss``).
        batches: Slice batches (e.g. from ``iter_batches``).
        max_batches: Stop after this many batches; all when None.

    Raises:
        ValueError: If there are no batches.
    """
    was_training = model.training
    model.eval()
    total_loss, total_rows = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            rows = next(iter(batch.values())).shape[0]
            total_loss += float(batch_loss(model, batch)) * rows
            total_rows += rows
    finally:
        model.train(was_training)
    if total_rows == 0:
        raise ValueError("evaluate needs at least one non-empty batch")
    return total_loss / total_rows


def iter_batches(
    tensors: Mapping[str, Tensor], batch_size: int, seed: int, drop_last: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Yield shuffled mini-batches over the first dimension of a data slice.

    The order depends only on ``seed`` and the number of rows, so trainers can replay it.

    Args:
        tensors: The slice's tensors by name, all with the same first dimension N.
        batch_size: Rows per batch; the last batch may be smaller unless ``drop_last``.
        seed: Seed of the shuffle.
        drop_last: Skip a final batch smaller than ``batch_size``.

    Raises:
        ValueError: If ``batch_size`` is not positive, the mapping is empty, or first
            dimensions differ.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not tensors:
        raise ValueError("iter_batches needs at least one tensor")
    sizes = {name: (t.shape[0] if t.dim() else -1) for name, t in tensors.items()}
    num_rows = next(iter(sizes.values()))
    if num_rows < 0 or any(size != num_rows for size in sizes.values()):
        raise ValueError(f"slice tensors need one shared first dimension, got {sizes}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_rows, generator=generator)  # [N]
    stop = num_rows - num_rows % batch_size if drop_last else num_rows
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]  # [b]
        yield {name: t.index_select(0, idx.to(t.device)) for name, t in tensors.items()}  # [b, ...]


def cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.1
) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine decay to a floor.

    Warmup rises linearly to ``base_lr`` at step ``warmup_steps - 1``; then the rate
    follows a half cosine down to ``base_lr * min_ratio`` at ``total_steps`` and stays there.

    Raises:
        ValueError: For a negative step, ``total_steps`` < 1, warmup outside
            [0, total_steps], a negative ``base_lr``, or ``min_ratio`` outside [0, 1].
    """
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be non-negative, got {base_lr}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return base_lr * min_ratio
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_ratio + (1.0 - min_ratio) * cosine)
