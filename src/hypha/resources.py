"""Resource amounts and the weighted price evaluator.

This module owns ``Resources`` (GPU, CPU, memory and storage as non-negative floats, with
addition, checked subtraction and a component-wise partial order) and the weighted-unit
price that both the worker's arbiter and the scheduler's offer ranking use:
``price / (25 gpu + 1 cpu + 0.1 memory + 0.01 storage)`` with the default weights.

It does not know about leases, offers or the network; ``hypha.leases`` reserves amounts and
``hypha.protocol.messages.ResourceSpec`` is the wire form (see ``to_spec``/``from_spec``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from hypha.protocol.messages import ResourceSpec

# Relative tolerance for comparisons and subtraction: amounts are sums of floats (memory in
# bytes can reach 1e12), so exact comparison would reject 0.3 - 0.1 - 0.2 and similar.
_REL_EPS = 1e-9


def _tolerance(x: float, y: float) -> float:
    return _REL_EPS * max(1.0, abs(x), abs(y))


def _check_component(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"resources.{name} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"resources.{name} must be >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of resources; every component is finite and non-negative.

    Units are the caller's convention (the project uses GPU count or GB of VRAM, CPU cores,
    memory GB and storage GB). ``a - b`` raises ``ValueError`` if any component would go
    negative by more than a rounding error; tiny negative rounding results clamp to zero.
    """

    gpu: float = 0.0
    cpu: float = 0.0
    memory: float = 0.0
    storage: float = 0.0

    def __post_init__(self) -> None:
        for field in fields(self):
            _check_component(field.name, getattr(self, field.name))

    def _components(self) -> tuple[float, float, float, float]:
        return (self.gpu, self.cpu, self.memory, self.storage)

    def __add__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        return Resources(
            gpu=self.gpu + other.gpu,
            cpu=self.cpu + other.cpu,
            memory=self.memory + other.memory,
            storage=self.storage + other.storage,
        )

    def __sub__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        result: list[float] = []
        for field, mine, theirs in zip(fields(self), self._components(), other._components(), strict=True):
            diff = mine - theirs
            if diff < 0:
                if -diff > _tolerance(mine, theirs):
                    raise ValueError(f"cannot subtract: {field.name} {theirs!r} exceeds {mine!r}")
                diff = 0.0
            result.append(diff)
        gpu, cpu, memory, storage = result
        return Resources(gpu=gpu, cpu=cpu, memory=memory, storage=storage)

    def fits_in(self, other: Resources) -> bool:
        """Whether every component is at most ``other``'s (within a rounding tolerance).

        This is a partial order: two amounts may each not fit in the other.

        Args:
            other: The amount to compare against, typically free capacity.

        Returns:
            True if ``self`` can be taken out of ``other`` without going negative.
        """
        return all(
            mine <= theirs + _tolerance(mine, theirs)
            for mine, theirs in zip(self._components(), other._components(), strict=True)
        )

    def is_zero(self) -> bool:
        """Whether every component is zero (up to a rounding tolerance)."""
        return all(value <= _REL_EPS for value in self._components())

    def to_spec(self) -> ResourceSpec:
        """Return the wire form of this amount."""
        return ResourceSpec(gpu=self.gpu, cpu=self.cpu, memory=self.memory, storage=self.storage)

    @classmethod
    def from_spec(cls, spec: ResourceSpec) -> Resources:
        """Build an amount from its wire form.

        Args:
            spec: A decoded ``ResourceSpec``.

        Returns:
            The equivalent ``Resources``.

        Raises:
            ValueError: A component is negative or not finite (a peer sent garbage).
        """
        return cls(
            gpu=float(spec.gpu),
            cpu=float(spec.cpu),
            memory=float(spec.memory),
            storage=float(spec.storage),
        )


@dataclass(frozen=True, slots=True)
class ResourceWeights:
    """How many weighted units one unit of each resource is worth when pricing.

    The defaults come from the original Hypha's ``WeightedResourceEvaluator``: a GPU is worth
    25 CPU cores, a GB of memory a tenth of a core, a GB of storage a hundredth.
    """

    gpu: float = 25.0
    cpu: float = 1.0
    memory: float = 0.1
    storage: float = 0.01

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weights.{field.name} must be finite and >= 0, got {value!r}")


def weighted_units(resources: Resources, weights: ResourceWeights) -> float:
    """Collapse an amount into one number of weighted units.

    Args:
        resources: The amount.
        weights: Units per resource unit.

    Returns:
        ``sum(weight * amount)`` over the four components.
    """
    return (
        weights.gpu * resources.gpu
        + weights.cpu * resources.cpu
        + weights.memory * resources.memory
        + weights.storage * resources.storage
    )


def price_per_unit(price: float, resources: Resources, weights: ResourceWeights) -> float:
    """Price divided by weighted units: lower is the better deal for a buyer.

    Args:
        price: The total price offered or bid.
        resources: The amount the price is for.
        weights: Units per resource unit.

    Returns:
        ``price / weighted_units(resources, weights)``, or ``math.inf`` when the amount is
        worth zero units (so an offer of nothing always ranks last).

    Raises:
        ValueError: ``price`` is negative or not finite.
    """
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"price must be finite and >= 0, got {price!r}")
    units = weighted_units(resources, weights)
    if units <= 0:
        return math.inf
    return price / units
