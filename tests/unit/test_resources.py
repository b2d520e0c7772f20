"""Resources arithmetic, partial order and the weighted price evaluator."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypha.protocol.messages import ResourceSpec
from hypha.resources import Resources, ResourceWeights, price_per_unit, weighted_units

amounts = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
resources = st.builds(Resources, gpu=amounts, cpu=amounts, memory=amounts, storage=amounts)


def approx_equal(a: Resources, b: Resources, scale: float = 1.0) -> bool:
    """Equal up to float rounding at magnitude ``scale`` (the largest operand involved)."""
    return all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12 * scale)
        for x, y in zip(parts(a), parts(b), strict=True)
    )


def parts(r: Resources) -> tuple[float, float, float, float]:
    return (r.gpu, r.cpu, r.memory, r.storage)


def magnitude(*values: Resources) -> float:
    return max([1.0, *(x for v in values for x in parts(v))])


def test_defaults_are_zero() -> None:
    assert Resources().is_zero()
    assert not Resources(cpu=1).is_zero()


@pytest.mark.parametrize("name", ["gpu", "cpu", "memory", "storage"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_rejects_bad_components(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        Resources(**{name: value})


def test_add_and_sub() -> None:
    a = Resources(gpu=1, cpu=4, memory=16, storage=100)
    b = Resources(gpu=0.5, cpu=2, memory=8, storage=0)
    assert a + b == Resources(gpu=1.5, cpu=6, memory=24, storage=100)
    assert a - b == Resources(gpu=0.5, cpu=2, memory=8, storage=100)


def test_sub_going_negative_raises() -> None:
    with pytest.raises(ValueError, match="cpu"):
        Resources(cpu=1) - Resources(cpu=2)


def test_sub_rounding_clamps_to_zero() -> None:
    left = Resources(cpu=0.3) - Resources(cpu=0.1)
    result = left - Resources(cpu=0.2)
    assert result.cpu >= 0
    assert result.is_zero()


def test_fits_in_is_partial() -> None:
    a = Resources(gpu=1, cpu=1)
    b = Resources(gpu=2, cpu=0.5)
    assert not a.fits_in(b)
    assert not b.fits_in(a)
    assert a.fits_in(Resources(gpu=1, cpu=1, memory=1))
    assert Resources(cpu=0.1 + 0.2).fits_in(Resources(cpu=0.3))


def test_spec_round_trip() -> None:
    r = Resources(gpu=1, cpu=2, memory=3, storage=4)
    spec = r.to_spec()
    assert spec == ResourceSpec(gpu=1, cpu=2, memory=3, storage=4)
    assert Resources.from_spec(spec) == r


def test_from_spec_rejects_negative() -> None:
    with pytest.raises(ValueError, match="memory"):
        Resources.from_spec(ResourceSpec(memory=-1))


def test_weighted_units_defaults() -> None:
    weights = ResourceWeights()
    r = Resources(gpu=2, cpu=8, memory=32, storage=500)
    assert weighted_units(r, weights) == pytest.approx(2 * 25 + 8 + 3.2 + 5)


def test_price_per_unit() -> None:
    weights = ResourceWeights()
    assert price_per_unit(50, Resources(gpu=2), weights) == pytest.approx(1.0)
    assert price_per_unit(10, Resources(), weights) == math.inf
    assert price_per_unit(0, Resources(), weights) == math.inf
    assert price_per_unit(0, Resources(cpu=1), weights) == 0.0
    with pytest.raises(ValueError, match="price"):
        price_per_unit(-1, Resources(cpu=1), weights)


def test_weights_reject_negative() -> None:
    with pytest.raises(ValueError, match="gpu"):
        ResourceWeights(gpu=-1)


@given(resources, resources)
def test_add_then_sub_is_identity(a: Resources, b: Resources) -> None:
    scale = magnitude(a, b)
    assert approx_equal((a + b) - b, a, scale)
    assert approx_equal((a + b) - a, b, scale)


@given(resources, resources)
def test_add_commutes(a: Resources, b: Resources) -> None:
    assert a + b == b + a


@given(resources, resources)
def test_parts_fit_in_sum(a: Resources, b: Resources) -> None:
    assert a.fits_in(a + b)
    assert b.fits_in(a + b)
    total = a + b
    assert (total - b).fits_in(total)


@given(resources)
def test_fits_in_is_reflexive(a: Resources) -> None:
    assert a.fits_in(a)
    assert Resources().fits_in(a)


@given(resources, resources, resources)
def test_fits_in_is_transitive(a: Resources, d1: Resources, d2: Resources) -> None:
    b = a + d1
    c = b + d2
    assert a.fits_in(b)
    assert b.fits_in(c)
    assert a.fits_in(c)


@given(resources, resources)
def test_fits_in_is_antisymmetric(a: Resources, b: Resources) -> None:
    if a.fits_in(b) and b.fits_in(a):
        assert approx_equal(a, b, magnitude(a, b) * 1e3)


@given(resources, resources)
def test_sub_succeeds_exactly_when_fits(a: Resources, b: Resources) -> None:
    if b.fits_in(a):
        assert (a - b).fits_in(a)
    else:
        with pytest.raises(ValueError, match="cannot subtract"):
            a - b
