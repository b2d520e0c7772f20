"""Tests for the fp32/fp16/int8 tensor encodings and atomic tensor files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hypha.training.compress import (
    ENCODING_METADATA_KEY,
    SCALE_SUFFIX,
    decode_tensors,
    encode_tensors,
    load_tensors_file,
    save_tensors_file,
)


def _sample(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(64, 32, generator=gen),
        "layer.bias": torch.randn(32, generator=gen) * 1e-3,
        "scalar": torch.tensor(0.5),
        "steps": torch.arange(4, dtype=torch.int64),
    }


def test_fp32_round_trip_is_exact_and_keeps_metadata():
    tensors = _sample()
    decoded, meta = decode_tensors(encode_tensors(tensors, "fp32", {"round": "3"}))
    assert meta == {ENCODING_METADATA_KEY: "fp32", "round": "3"}
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor)


def test_fp16_round_trip_relative_error():
    tensors = _sample()
    decoded, meta = decode_tensors(encode_tensors(tensors, "fp16"))
    assert meta[ENCODING_METADATA_KEY] == "fp16"
    for name in ("layer.weight", "layer.bias", "scalar"):
        assert decoded[name].dtype == torch.float32
        # fp16 keeps 11 significant bits: relative error <= 2**-11 for normal numbers.
        torch.testing.assert_close(decoded[name], tensors[name], rtol=2**-11, atol=1e-7)
    assert torch.equal(decoded["steps"], tensors["steps"])


def test_int8_round_trip_error_within_half_a_step():
    tensors = _sample()
    data = encode_tensors(tensors, "int8")
    decoded, meta = decode_tensors(data)
    assert meta[ENCODING_METADATA_KEY] == "int8"
    assert decoded.keys() == tensors.keys()
    for name in ("layer.weight", "layer.bias", "scalar"):
        scale = tensors[name].abs().max() / 127
        err = (decoded[name] - tensors[name]).abs()
        assert bool((err <= scale / 2 + 1e-7).all()), name
    # The largest magnitude is represented exactly as +-127 * scale.
    i = tensors["layer.weight"].abs().argmax()
    torch.testing.assert_close(decoded["layer.weight"].flatten()[i], tensors["layer.weight"].flatten()[i])
    assert torch.equal(decoded["steps"], tensors["steps"])


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
        min_size=1,
        max_size=50,
    )
)
def test_int8_error_bound_property(values):
    x = torch.tensor(values, dtype=torch.float32)
    decoded, _ = decode_tensors(encode_tensors({"x": x}, "int8"))
    scale = x.abs().max() / 127
    assert bool(((decoded["x"] - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-30).all())


def test_sizes_shrink_with_encoding():
    tensors = {"w": torch.randn(256, 256)}
    sizes = {enc: len(encode_tensors(tensors, enc)) for enc in ("fp32", "fp16", "int8")}
    raw = 256 * 256 * 4
    assert raw <= sizes["fp32"] < raw + 512
    assert sizes["fp16"] < 0.51 * sizes["fp32"]
    assert sizes["int8"] < 0.26 * sizes["fp32"]


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_zero_and_empty_tensors(encoding):
    tensors = {"zeros": torch.zeros(3, 2), "empty": torch.zeros(0, 4)}
    decoded, _ = decode_tensors(encode_tensors(tensors, encoding))
    assert torch.equal(decoded["zeros"], tensors["zeros"])
    assert decoded["empty"].shape == (0, 4)


def test_int8_stores_int8_payload_and_float32_scale():
    from safetensors.torch import load

    raw = load(encode_tensors({"w": torch.randn(5, 5)}, "int8"))
    assert raw["w"].dtype == torch.int8
    assert raw["w" + SCALE_SUFFIX].dtype == torch.float32
    assert raw["w" + SCALE_SUFFIX].dim() == 0


def test_tied_and_sliced_tensors_encode():
    base = torch.randn(6, 4)
    tensors = {"a": base, "tied": base, "top": base[:3], "bottom": base[3:]}
    decoded, _ = decode_tensors(encode_tensors(tensors, "fp32"))
    assert torch.equal(decoded["tied"], base)
    assert torch.equal(decoded["bottom"], base[3:])


def test_half_and_bfloat16_inputs_decode_to_float32():
    tensors = {"h": torch.ones(3, dtype=torch.float16), "b": torch.ones(3, dtype=torch.bfloat16)}
    for encoding in ("fp32", "fp16", "int8"):
        decoded, _ = decode_tensors(encode_tensors(tensors, encoding))
        assert decoded["h"].dtype == torch.float32
        assert torch.equal(decoded["b"], torch.ones(3))


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="encoding"):
        encode_tensors({"w": torch.ones(2)}, "bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        encode_tensors({"w": torch.ones(2)}, "fp32", {ENCODING_METADATA_KEY: "x"})
    with pytest.raises(ValueError, match="reserved suffix"):
        encode_tensors({"w" + SCALE_SUFFIX: torch.ones(2)}, "fp32")
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensors({"w": torch.tensor([1.0, float("nan")])}, "int8")


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"\xff" * 16],
)
def test_decode_rejects_garbage(data):
    with pytest.raises(ValueError, match="safetensors"):
        decode_tensors(data)


def test_decode_rejects_inconsistent_payloads():
    from safetensors.torch import save

    orphan = save({"w" + SCALE_SUFFIX: torch.tensor(1.0)}, metadata={"encoding": "int8"})
    with pytest.raises(ValueError, match="no int8 tensor"):
        decode_tensors(orphan)
    unknown = save({"w": torch.ones(1)}, metadata={"encoding": "fp8"})
    with pytest.raises(ValueError, match="fp8"):
        decode_tensors(unknown)
    bad_scale = save(
        {"w": torch.ones(2, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones(2)},
        metadata={"encoding": "int8"},
    )
    with pytest.raises(ValueError, match="scalar"):
        decode_tensors(bad_scale)


def test_plain_safetensors_without_metadata_decode_as_fp32():
    from safetensors.torch import save

    decoded, meta = decode_tensors(save({"w": torch.ones(2, dtype=torch.float16)}))
    assert meta == {ENCODING_METADATA_KEY: "fp32"}
    assert decoded["w"].dtype == torch.float32


def test_file_round_trip_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "update.safetensors"
    size = save_tensors_file(path, _sample(), "fp16", {"round": "1"})
    assert size == path.stat().st_size
    save_tensors_file(path, _sample(1), "int8")  # overwrite
    decoded, meta = load_tensors_file(path)
    assert meta[ENCODING_METADATA_KEY] == "int8"
    assert decoded.keys() == _sample().keys()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failed_save_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_tensors_file(path, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="non-finite"):
        save_tensors_file(path, {"w": torch.tensor([float("inf")])}, "int8")
    decoded, _ = load_tensors_file(path)
    assert torch.equal(decoded["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(FileNotFoundError):
        save_tensors_file(tmp_path / "missing" / "x.safetensors", {"w": torch.ones(1)})
