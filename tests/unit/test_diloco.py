"""Tests for the shared DiLoCo helpers, plus a two-worker DiLoCo run in one process."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hypha.training.diloco import (
    cosine_lr,
    evaluate,
    iter_batches,
    load_params,
    params_equal,
    pseudo_gradient,
    snapshot,
)
from hypha.training.models import batch_loss, build_model
from hypha.training.outer import NesterovOuter, weighted_mean

MLP = {"input_dim": 8, "hidden_dim": 16, "num_classes": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic(num_rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Linearly separable 4-class data from a fixed teacher (same teacher for every seed)."""
    teacher = torch.randn(8, 4, generator=torch.Generator().manual_seed(1234))  # [8, 4]
    inputs = torch.randn(num_rows, 8, generator=torch.Generator().manual_seed(seed))  # [N, 8]
    return {"inputs": inputs, "labels": (inputs @ teacher).argmax(dim=1)}  # [N]


def test_snapshot_is_a_detached_float32_cpu_copy():
    model = build_model("gpt", {"seq_len": 8, "dim": 16, "num_heads": 2, "num_layers": 1}, seed=0)
    snap = snapshot(model)
    assert list(snap) == [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in snap  # tied to wte.weight, listed once
    for name, param in model.named_parameters():
        assert snap[name].dtype == torch.float32
        assert not snap[name].requires_grad
        assert snap[name].data_ptr() != param.data_ptr()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not params_equal(snap, snapshot(model))


def test_pseudo_gradient_is_global_minus_local():
    model = build_model("mlp", MLP, seed=0)
    start = snapshot(model)
    with torch.no_grad():
        for param in model.parameters():
            param.sub_(0.25)
    delta = pseudo_gradient(start, model)
    for tensor in delta.values():
        torch.testing.assert_close(tensor, torch.full_like(tensor, 0.25))
    with pytest.raises(ValueError, match="missing"):
        pseudo_gradient({}, model)


def test_load_params_copies_in_place_and_keeps_optimizer_binding():
    model = build_model("mlp", MLP, seed=0)
    other = snapshot(build_model("mlp", MLP, seed=1))
    ids_before = [id(p) for p in model.parameters()]
    load_params(model, {k: v.to(torch.float64) for k, v in other.items()})
    assert [id(p) for p in model.parameters()] == ids_before
    assert params_equal(snapshot(model), other)
    with pytest.raises(ValueError, match="unexpected"):
        load_params(model, {**other, "extra": torch.ones(1)})
    bad = dict(other)
    name = next(iter(bad))
    bad[name] = torch.ones(1)
    with pytest.raises(ValueError, match="shape"):
        load_params(model, bad)


def test_params_equal():
    a = {"x": torch.ones(2), "y": torch.zeros(3)}
    assert params_equal(a, {"x": torch.ones(2, dtype=torch.float64), "y": torch.zeros(3)})
    assert not params_equal(a, {"x": torch.ones(2)})
    assert not params_equal(a, {"x": torch.ones(3), "y": torch.zeros(3)})
    near = {"x": torch.ones(2) + 1e-4, "y": torch.zeros(3)}
    assert not params_equal(a, near)
    assert params_equal(a, near, atol=1e-3)


def test_evaluate_weights_by_batch_size_and_restores_mode():
    model = build_model("mlp", MLP, seed=0)
    data = _synthetic(10, seed=0)
    batches = list(iter_batches(data, batch_size=4, seed=0))  # sizes 4, 4, 2
    with torch.no_grad():
        full = batch_loss(model, data).item()
    assert model.training
    assert evaluate(model, batches) == pytest.approx(full, rel=1e-5)
    assert model.training
    assert evaluate(model, batches, max_batches=1) == pytest.approx(
        batch_loss(model, batches[0]).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="at least one"):
        evaluate(model, [])


def test_iter_batches_is_a_deterministic_partition():
    data = {"inputs": torch.arange(10).view(10, 1).float(), "labels": torch.arange(10)}
    batches = list(iter_batches(data, batch_size=3, seed=7))
    assert [len(b["labels"]) for b in batches] == [3, 3, 3, 1]
    seen = torch.cat([b["labels"] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    for batch in batches:  # rows stay aligned across tensors
        assert torch.equal(batch["inputs"].view(-1).long(), batch["labels"])
    again = torch.cat([b["labels"] for b in iter_batches(data, batch_size=3, seed=7)])
    other = torch.cat([b["labels"] for b in iter_batches(data, batch_size=3, seed=8)])
    assert torch.equal(seen, again)
    assert not torch.equal(seen, other)
    dropped = list(iter_batches(data, batch_size=3, seed=7, drop_last=True))
    assert [len(b["labels"]) for b in dropped] == [3, 3, 3]


@pytest.mark.parametrize(
    ("tensors", "batch_size", "match"),
    [
        ({"a": torch.ones(3)}, 0, "batch_size"),
        ({}, 2, "at least one"),
        ({"a": torch.ones(3), "b": torch.ones(4)}, 2, "first dimension"),
        ({"a": torch.tensor(1.0)}, 2, "first dimension"),
    ],
)
def test_iter_batches_rejects_bad_input(tensors, batch_size, match):
    with pytest.raises(ValueError, match=match):
        list(iter_batches(tensors, batch_size=batch_size, seed=0))


def test_cosine_lr_shape():
    lrs = [cosine_lr(s, total_steps=100, warmup_steps=10, base_lr=1.0) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lrs[100] == pytest.approx(0.1)
    assert lrs[119] == pytest.approx(0.1)
    decay = lrs[10:101]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert cosine_lr(0, total_steps=5, warmup_steps=0, base_lr=2.0, min_ratio=0.0) == 2.0
    assert cosine_lr(5, total_steps=5, warmup_steps=5, base_lr=2.0) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1}, "step"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 11}, "warmup_steps"),
        ({"base_lr": -1.0}, "base_lr"),
        ({"min_ratio": 1.5}, "min_ratio"),
    ],
)
def test_cosine_lr_rejects_bad_input(kwargs, match):
    args = {"step": 0, "total_steps": 10, "warmup_steps": 2, "base_lr": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        cosine_lr(**args)


def test_two_worker_diloco_reduces_loss():
    """DiLoCo in one process: 2 trainers with AdamW, H=5 inner steps, unequal batches."""
    num_rounds, inner_steps = 6, 5
    shards = [_synthetic(240, seed=1), _synthetic(120, seed=2)]
    batch_sizes = [24, 12]  # trainer 0 sees twice the samples, so it weighs twice as much
    held_out = list(iter_batches(_synthetic(256, seed=3), batch_size=128, seed=0))

    global_model = build_model("mlp", MLP, seed=0)
    global_params = snapshot(global_model)
    workers = [build_model("mlp", MLP, seed=0) for _ in shards]
    inner_opts = [torch.optim.AdamW(w.parameters(), lr=1e-2, weight_decay=0.0) for w in workers]
    outer = NesterovOuter(lr=0.7, momentum=0.9)
    initial_loss = evaluate(global_model, held_out)

    losses = []
    for round_index in range(num_rounds):
        deltas, samples = [], []
        for rank, worker in enumerate(workers):
            opt = inner_opts[rank]
            load_params(worker, global_params)  # every round starts from the global weights
            batches = iter_batches(shards[rank], batch_sizes[rank], seed=round_index * 10 + rank)
            num_samples = 0
            for _, batch in zip(range(inner_steps), batches, strict=False):
                opt.zero_grad(set_to_none=True)
                batch_loss(worker, batch).backward()
                opt.step()
                num_samples += batch["labels"].shape[0]
            deltas.append(pseudo_gradient(global_params, worker))
            samples.append(num_samples)
        assert samples == [120, 60]
        outer.step(global_params, weighted_mean(deltas, samples))
        load_params(global_model, global_params)
        losses.append(evaluate(global_model, held_out))

    # Every worker applies the same new weights, so all replicas agree after a sync.
    for worker in workers:
        load_params(worker, global_params)
        assert params_equal(snapshot(worker), global_params)
    assert all(math.isfinite(loss) for loss in losses)
    # Seeded run: about 1.40 -> 1.21, 0.99, 0.78, 0.61, 0.46, 0.35.
    assert losses[-1] < 0.5 * initial_loss, (initial_loss, losses)
    assert losses == sorted(losses, reverse=True), losses
