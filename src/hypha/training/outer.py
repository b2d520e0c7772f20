"""The parameter server's DiLoCo maths: averaging pseudo-gradients and the outer step.

Owns ``weighted_mean`` (the sample-weighted mean of the trainers' pseudo-gradients) and
``NesterovOuter`` (SGD with Nesterov momentum applied to the global weights, with
checkpointable momentum buffers). It does not receive updates, decide when a round closes,
or write checkpoints: the parameter server role does that.

DiLoCo (Douillard et al. 2023): each trainer runs H inner steps from the global weights
theta and sends delta_i = theta - theta_i. The server averages delta over trainers, weighted
by samples, and treats the mean as a gradient for an outer SGD-Nesterov step on theta.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def _check_same_layout(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str) -> None:
    """Raise ValueError unless ``other`` has exactly the keys and shapes of ``reference``."""
    missing = reference.keys() - other.keys()
    extra = other.keys() - reference.keys()
    if missing or extra:
        raise ValueError(f"{what}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
    for name, tensor in reference.items():
        if other[name].shape != tensor.shape:
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(other[name].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )


def weighted_mean(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Average tensors by name, each update weighted by its sample count.

    Computes sum_i(w_i * u_i) / sum_i(w_i) per name, accumulating in float32 on the first
    update's device. Unlike a running pairwise mean, this is exact for any number of
    updates and weighs each by the samples behind it.

    Args:
        updates: One mapping of name to tensor per trainer; all with the same keys/shapes.
        weights: Non-negative weight per update (normally its sample count).

    Returns:
        A new float32 tensor per name.

    Raises:
        ValueError: If there are no updates, the lengths differ, keys or shapes differ, a
            weight is negative or not finite, or the weights sum to zero.
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    for i, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight {i} must be finite and non-negative, got {weight}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("weights sum to zero; nothing to average")
    first = updates[0]
    for i, update in enumerate(updates[1:], start=1):
        _check_same_layout(first, update, f"update {i}")
    mean: dict[str, Tensor] = {}
    for name, tensor in first.items():
        acc = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)  # [*shape]
        for update, weight in zip(updates, weights, strict=True):
            acc.add_(update[name].to(acc.device, torch.float32), alpha=weight)  # [*shape]
        mean[name] = acc.div_(total)  # [*shape]
    return mean


class NesterovOuter:
    """SGD with Nesterov momentum over a dict of global parameters, updated in place.

    Matches ``torch.optim.SGD(lr, momentum, nesterov=True)`` (no dampening, no weight
    decay) step for step, where the gradient is the pseudo-gradient theta - mean(theta_i):

        buf = g                    (first step)
        buf = momentum * buf + g   (later steps)
        theta -= lr * (g + momentum * buf)

    Momentum buffers live in float32 on each parameter's device.
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        """Create the optimizer.

        Args:
            lr: Outer learning rate (DiLoCo uses 0.7).
            momentum: Nesterov momentum in [0, 1) (DiLoCo uses 0.9).

        Raises:
            ValueError: If ``lr`` is not positive or ``momentum`` is outside [0, 1).
        """
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"outer lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.momentum = momentum
        self.num_steps = 0
        self._buffers: dict[str, Tensor] = {}

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], outer_grad: Mapping[str, Tensor]) -> None:
        """Apply one outer step to ``params`` in place.

        Args:
            params: The global weights by name; updated in place (any device, float dtype).
            outer_grad: The averaged pseudo-gradient theta - mean(theta_i), same keys/shapes.

        Raises:
            ValueError: If the keys or shapes of ``outer_grad`` differ from ``params``, or
                from the momentum buffers of earlier steps.
        """
        _check_same_layout(params, outer_grad, "outer gradient")
        if self._buffers:
            _check_same_layout(params, self._buffers, "momentum buffers")
        for name, param in params.items():
            grad = outer_grad[name].to(param.device, torch.float32)  # [*shape]
            buf = self._buffers.get(name)
            if buf is None:
                buf = grad.clone()  # [*shape]
                self._buffers[name] = buf
            else:
                if buf.device != param.device:  # restored on another device
                    buf = self._buffers[name] = buf.to(param.device)
                buf.mul_(self.momentum).add_(grad)  # [*shape]
            direction = grad.add(buf, alpha=self.momentum)  # [*shape]
            if param.dtype == torch.float32:
                param.add_(direction, alpha=-self.lr)  # [*shape]
            else:  # keep the update in float32, then round once into the storage dtype
                param.copy_(param.float().add_(direction, alpha=-self.lr))  # [*shape]
        self.num_steps += 1
        logger.debug("outer step %d applied to %d tensors", self.num_steps, len(params))

    def state_dict(self) -> dict[str, Tensor]:
        """Return the optimizer state as a flat tensor dict (safetensors friendly).

        Keys are ``momentum.<param name>`` (CPU float32 copies) plus ``num_steps`` (an
        int64 scalar). Learning rate and momentum come from the job config, not the state.
        """
        state = {f"momentum.{name}": buf.detach().cpu().clone() for name, buf in self._buffers.items()}
        state["num_steps"] = torch.tensor(self.num_steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor], device: torch.device | None = None) -> None:
        """Restore state written by ``state_dict``.

        Args:
            state: The mapping ``state_dict`` returned (possibly after a file round trip).
            device: Where to keep the momentum buffers; CPU when None.

        Raises:
            ValueError: If ``num_steps`` is missing or a key is not recognised.
        """
        if "num_steps" not in state:
            raise ValueError("outer optimizer state has no 'num_steps'")
        buffers: dict[str, Tensor] = {}
        for key, tensor in state.items():
            if key == "num_steps":
                continue
            if not key.startswith("momentum."):
                raise ValueError(f"unexpected key {key!r} in outer optimizer state")
            buffers[key.removeprefix("momentum.")] = tensor.detach().to(
                device or torch.device("cpu"), torch.float32, copy=True
            )
        self._buffers = buffers
        self.num_steps = int(state["num_steps"].item())
