"""Tests for the parameter server maths: weighted_mean and NesterovOuter."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hypha.training.outer import NesterovOuter, weighted_mean

SHAPES = {"w": (4, 3), "b": (3,), "scalar": ()}


def _random_params(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def test_weighted_mean_three_workers_matches_hand_computation():
    # Three trainers with different sample counts: 10, 30 and 60 samples.
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor(3.0)}
    b = {"x": torch.tensor([2.0, 4.0]), "y": torch.tensor(-1.0)}
    c = {"x": torch.tensor([4.0, -2.0]), "y": torch.tensor(0.5)}
    mean = weighted_mean([a, b, c], [10, 30, 60])
    expected_x = torch.tensor(
        [(10 * 1 + 30 * 2 + 60 * 4) / 100, (10 * 0 + 30 * 4 + 60 * -2) / 100]
    )  # [3.1, 0.0]
    expected_y = torch.tensor((10 * 3 + 30 * -1 + 60 * 0.5) / 100)  # 0.3
    torch.testing.assert_close(mean["x"], expected_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(mean["y"], expected_y, atol=1e-6, rtol=0)
    # The original's running pairwise mean ((a + b) / 2 + c) / 2 gives another answer.
    pairwise = ((a["x"] + b["x"]) / 2 + c["x"]) / 2
    assert not torch.allclose(pairwise, expected_x, atol=1e-3)


def test_weighted_mean_equal_weights_is_plain_mean_and_float32():
    gen = torch.Generator().manual_seed(0)
    updates = [{k: v.to(torch.float16) for k, v in _random_params(gen).items()} for _ in range(4)]
    mean = weighted_mean(updates, [5, 5, 5, 5])
    for name in SHAPES:
        assert mean[name].dtype == torch.float32
        stacked = torch.stack([u[name].float() for u in updates])
        torch.testing.assert_close(mean[name], stacked.mean(0), atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=6))
def test_weighted_mean_of_constant_updates_is_the_constant(weights):
    updates = [{"v": torch.full((2,), 0.25)} for _ in weights]
    torch.testing.assert_close(weighted_mean(updates, weights)["v"], torch.full((2,), 0.25))


def test_weighted_mean_zero_weight_update_is_ignored():
    mean = weighted_mean([{"v": torch.ones(2)}, {"v": torch.full((2,), 99.0)}], [3, 0])
    torch.testing.assert_close(mean["v"], torch.ones(2))


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        ([], [], "at least one"),
        ([{"v": torch.ones(2)}], [1, 2], "weights"),
        ([{"v": torch.ones(2)}, {"w": torch.ones(2)}], [1, 1], "missing"),
        ([{"v": torch.ones(2)}, {"v": torch.ones(3)}], [1, 1], "shape"),
        ([{"v": torch.ones(2)}], [0], "sum to zero"),
        ([{"v": torch.ones(2)}], [-1], "non-negative"),
        ([{"v": torch.ones(2)}], [math.nan], "finite"),
    ],
)
def test_weighted_mean_rejects_bad_input(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_mean(updates, weights)


def _reference_run(global0, local_rounds, weights, lr, momentum):
    """Plain single-process DiLoCo outer loop with torch.optim.SGD(nesterov=True)."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in global0.items()}
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum, nesterov=True)
    history = []
    for locals_ in local_rounds:
        for name, p in params.items():
            deltas = torch.stack([p.detach() - loc[name] for loc in locals_])  # [W, *shape]
            w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * p.dim()))
            p.grad = (deltas * w).sum(0) / sum(weights)  # [*shape]
        opt.step()
        history.append({k: v.detach().clone() for k, v in params.items()})
    return history


def _make_rounds(seed, num_rounds, num_workers):
    gen = torch.Generator().manual_seed(seed)
    global0 = _random_params(gen)
    # Each local result is the current global minus an offset, for each implementation.
    offsets = [
        [{k: 0.1 * v for k, v in _random_params(gen).items()} for _ in range(num_workers)]
        for _ in range(num_rounds)
    ]
    return global0, offsets


@pytest.mark.parametrize(("lr", "momentum"), [(0.7, 0.9), (0.1, 0.7), (1.0, 0.0)])
def test_nesterov_outer_matches_torch_sgd_over_rounds(lr, momentum):
    weights = [10, 30, 60]
    global0, offsets = _make_rounds(seed=1, num_rounds=6, num_workers=3)

    # Reference: the locals of each round are offsets from the reference's current global.
    ref_params = {k: torch.nn.Parameter(v.clone()) for k, v in global0.items()}
    # torch refuses nesterov=True without momentum; momentum 0 is plain SGD either way.
    ref_opt = torch.optim.SGD(ref_params.values(), lr=lr, momentum=momentum, nesterov=momentum > 0)
    params = {k: v.clone() for k, v in global0.items()}
    outer = NesterovOuter(lr=lr, momentum=momentum)
    for round_offsets in offsets:
        locals_ref = [{k: ref_params[k].detach() - o[k] for k in o} for o in round_offsets]
        locals_ours = [{k: params[k] - o[k] for k in o} for o in round_offsets]
        # Reference gradient: the mean pseudo-gradient, computed by hand.
        for name, p in ref_params.items():
            p.grad = sum(
                w * (p.detach() - loc[name]) for w, loc in zip(weights, locals_ref, strict=True)
            ) / sum(weights)
        ref_opt.step()
        pseudo = [{k: params[k] - loc[k] for k in params} for loc in locals_ours]
        outer.step(params, weighted_mean(pseudo, weights))
        for name in params:
            torch.testing.assert_close(params[name], ref_params[name].detach(), atol=1e-6, rtol=0)
    assert outer.num_steps == len(offsets)


def test_nesterov_outer_matches_reference_helper_with_fixed_locals():
    gen = torch.Generator().manual_seed(5)
    global0 = _random_params(gen)
    rounds = [[_random_params(gen) for _ in range(2)] for _ in range(4)]
    weights = [7.0, 3.0]
    history = _reference_run(global0, rounds, weights, lr=0.7, momentum=0.9)
    params = {k: v.clone() for k, v in global0.items()}
    outer = NesterovOuter()
    for locals_, expected in zip(rounds, history, strict=True):
        deltas = [{k: params[k] - loc[k] for k in params} for loc in locals_]
        outer.step(params, weighted_mean(deltas, weights))
        for name in params:
            torch.testing.assert_close(params[name], expected[name], atol=1e-6, rtol=0)


def test_outer_lr_one_without_momentum_is_federated_averaging():
    gen = torch.Generator().manual_seed(3)
    params = _random_params(gen)
    locals_ = [_random_params(gen) for _ in range(3)]
    weights = [1, 2, 5]
    deltas = [{k: params[k] - loc[k] for k in params} for loc in locals_]
    NesterovOuter(lr=1.0, momentum=0.0).step(params, weighted_mean(deltas, weights))
    expected = weighted_mean(locals_, weights)
    for name in params:
        torch.testing.assert_close(params[name], expected[name], atol=1e-6, rtol=0)


def test_nesterov_outer_state_dict_round_trip_resumes_identically():
    gen = torch.Generator().manual_seed(2)
    params_a = _random_params(gen)
    grads = [_random_params(gen) for _ in range(5)]
    params_b = {k: v.clone() for k, v in params_a.items()}
    a = NesterovOuter(lr=0.5, momentum=0.8)
    for g in grads:
        a.step(params_a, g)
    b = NesterovOuter(lr=0.5, momentum=0.8)
    for g in grads[:2]:
        b.step(params_b, g)
    state = b.state_dict()
    assert set(state) == {f"momentum.{k}" for k in SHAPES} | {"num_steps"}
    resumed = NesterovOuter(lr=0.5, momentum=0.8)
    resumed.load_state_dict(state)
    assert resumed.num_steps == 2
    for g in grads[2:]:
        resumed.step(params_b, g)
    for name in params_a:
        torch.testing.assert_close(params_b[name], params_a[name], atol=0, rtol=0)


def test_nesterov_outer_updates_half_precision_params_in_place():
    params = {"v": torch.ones(3, dtype=torch.bfloat16)}
    storage = params["v"]
    NesterovOuter(lr=0.5, momentum=0.9).step(params, {"v": torch.ones(3)})
    assert params["v"] is storage
    # First step: buf = g, update = g + 0.9 * g = 1.9, theta = 1 - 0.5 * 1.9 = 0.05.
    torch.testing.assert_close(params["v"].float(), torch.full((3,), 0.05), atol=1e-2, rtol=0)


def test_nesterov_outer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        NesterovOuter(lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        NesterovOuter(momentum=1.0)
    outer = NesterovOuter()
    with pytest.raises(ValueError, match="missing"):
        outer.step({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        outer.step({"a": torch.ones(2)}, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match="num_steps"):
        outer.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected"):
        outer.load_state_dict({"num_steps": torch.tensor(0), "velocity.a": torch.ones(1)})
