"""Tests for the built-in models, build_model/build_hf_model and batch_loss."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hypha.protocol.tasks import ModelDoc
from hypha.training.models import (
    GPTConfig,
    MLPClassifier,
    MLPConfig,
    TinyGPT,
    batch_loss,
    build_hf_model,
    build_model,
    build_task_model,
    check_task_model,
)

SMALL_GPT = {"seq_len": 16, "dim": 32, "num_heads": 2, "num_layers": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gpt_shapes_and_initial_loss_near_uniform():
    model = build_model("gpt", SMALL_GPT, seed=0)
    assert isinstance(model, TinyGPT)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    logits, loss = model(ids, ids)
    assert logits.shape == (3, 16, 256)
    assert loss is not None
    assert loss.shape == ()
    # Small init: predictions start close to uniform over 256 bytes.
    assert abs(loss.item() - math.log(256)) < 0.2
    logits_only, no_loss = model(ids)
    assert no_loss is None
    torch.testing.assert_close(logits_only, logits)


def test_gpt_loss_is_next_token_over_t_minus_1_positions():
    model = build_model("gpt", SMALL_GPT, seed=0)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    logits, loss = model(ids, ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_gpt_is_causal():
    model = build_model("gpt", SMALL_GPT, seed=0).eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 256
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_output_head_is_tied():
    model = build_model("gpt", SMALL_GPT, seed=0)
    assert isinstance(model, TinyGPT)
    assert model.lm_head.weight is model.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names
    assert "lm_head.weight" not in names


def test_gpt_rejects_too_long_input():
    model = build_model("gpt", SMALL_GPT, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_learns_a_repeated_batch():
    torch.manual_seed(0)
    model = build_model("gpt", SMALL_GPT, seed=0)
    batch = {"input_ids": torch.arange(32).reshape(2, 16) % 7}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = batch_loss(model, batch).item()
    for _ in range(12):
        opt.zero_grad()
        batch_loss(model, batch).backward()
        opt.step()
    assert batch_loss(model, batch).item() < first / 2


def test_mlp_shapes_and_loss():
    model = build_model("mlp", {"input_dim": 8, "num_classes": 3, "num_layers": 3}, seed=0)
    assert isinstance(model, MLPClassifier)
    x = torch.randn(5, 8)
    y = torch.tensor([0, 1, 2, 1, 0])
    logits, loss = model(x, y)
    assert logits.shape == (5, 3)
    assert loss is not None
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3


def test_build_model_is_deterministic_per_seed_and_keeps_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("gpt", SMALL_GPT, seed=7)
    b = build_model("gpt", SMALL_GPT, seed=7)
    c = build_model("gpt", SMALL_GPT, seed=8)
    torch.testing.assert_close(torch.rand(3), expected_next)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    pairs = zip(a.parameters(), c.parameters(), strict=True)
    assert any(not torch.equal(pa, pc) for pa, pc in pairs)


def test_build_model_defaults_match_configs():
    gpt = build_model("gpt", {}, seed=0)
    assert isinstance(gpt, TinyGPT)
    assert gpt.config == GPTConfig()
    mlp = build_model("mlp", {}, seed=0)
    assert isinstance(mlp, MLPClassifier)
    assert mlp.config == MLPConfig()


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("resnet", {}, "resnet"),
        ("gpt", {"width": 3}, "width"),
        ("mlp", {"seq_len": 3}, "seq_len"),
        ("gpt", {"dim": 2.5}, "dim"),
        ("gpt", {"dim": 30, "num_heads": 4}, "num_heads"),
        ("mlp", {"hidden_dim": 0}, "hidden_dim"),
        ("gpt", {"dropout": 1.0}, "dropout"),
        ("mlp", {"num_layers": True}, "num_layers"),
    ],
)
def test_build_model_rejects_bad_input(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, options, seed=0)


def test_build_model_accepts_int_for_float_option():
    model = build_model("gpt", {**SMALL_GPT, "dropout": 0}, seed=0)
    assert isinstance(model, TinyGPT)
    assert model.config.dropout == 0.0


TINY_GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_positions": 64,
    "n_embd": 32,
    "n_layer": 1,
    "n_head": 2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def hf_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY_GPT2))
    return tmp_path


def test_hf_config_dir_builds_a_seeded_causal_lm_that_learns(tmp_path: Path) -> None:
    config_dir = hf_dir(tmp_path)
    model = build_task_model(ModelDoc(kind="hf", path=str(config_dir)), seed=3, base_dir=Path("/"))
    again = build_hf_model(config_dir, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    batch = {"input_ids": torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = batch_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hf_path_is_relative_to_the_task_directory(tmp_path: Path) -> None:
    tiny = tmp_path / "models" / "tiny"
    tiny.mkdir(parents=True)
    hf_dir(tiny)
    model = build_task_model(ModelDoc(kind="hf", path="models/tiny"), seed=0, base_dir=tmp_path)
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ValueError, match=r"config\.json"):
        build_task_model(ModelDoc(kind="hf", path="models"), seed=0, base_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a path"):
        build_task_model(ModelDoc(kind="hf"), seed=0, base_dir=tmp_path)


def test_build_hf_model_without_transformers_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(ValueError, match="transformers"):
        build_hf_model(hf_dir(tmp_path))


def test_batch_loss_casts_dtypes_and_checks_keys():
    mlp = build_model("mlp", {"input_dim": 4, "num_classes": 2}, seed=0)
    batch = {
        "inputs": torch.ones(3, 4, dtype=torch.float64),
        "labels": torch.tensor([0, 1, 1], dtype=torch.int32),
    }
    assert batch_loss(mlp, batch).shape == ()
    with pytest.raises(ValueError, match="labels"):
        batch_loss(mlp, {"inputs": torch.ones(3, 4)})
    gpt = build_model("gpt", SMALL_GPT, seed=0)
    byte_batch = {"input_ids": torch.randint(0, 256, (2, 16), dtype=torch.int64).to(torch.uint8)}
    assert batch_loss(gpt, byte_batch).shape == ()
    with pytest.raises(ValueError, match="input_ids"):
        batch_loss(gpt, {"inputs": torch.ones(2, 16)})


def test_check_task_model_counts_on_the_meta_device_what_trainers_build(tmp_path: Path) -> None:
    doc = ModelDoc(name="gpt", options={k: float(v) for k, v in SMALL_GPT.items()})
    real = build_task_model(doc, seed=0, base_dir=tmp_path)
    assert check_task_model(doc, tmp_path) == sum(p.numel() for p in real.parameters())
    hf = ModelDoc(kind="hf", path=str(hf_dir(tmp_path)))
    real_hf = build_task_model(hf, seed=0, base_dir=Path("/"))
    assert check_task_model(hf, Path("/")) == sum(p.numel() for p in real_hf.parameters())
    # A relative config directory is the trainers' (their task directory): not checked here.
    assert check_task_model(ModelDoc(kind="hf", path="models/tiny"), tmp_path) == 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (ModelDoc(name="gtp"), "unknown model 'gtp'; built-in models: gpt, mlp"),
        (ModelDoc(name="gpt", options={"dimm": 64.0}), "unknown option 'dimm' for model 'gpt'; known: "),
        (ModelDoc(name="gpt", options={"dim": 1e9, "num_heads": 1.0}), "too large to build"),
        (ModelDoc(name="gpt", options={"dim": 3e4, "num_heads": 1.0}), "more than the limit of"),
        (ModelDoc(name="gpt", options={"num_layers": 1e8}), "num_layers must be at most 1000"),
        (ModelDoc(kind="hf", path="/nonexistent/model"), r"holds no config\.json"),
    ],
)
def test_check_task_model_refuses_what_no_trainer_could_build(doc: ModelDoc, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_task_model(doc, Path("/"))
