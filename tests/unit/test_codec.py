"""The wire codec: every message round-trips; bad frames become one ProtocolError."""

from __future__ import annotations

import contextlib
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypha.protocol import codec
from hypha.protocol import messages as m

ALL_KINDS = typing.get_args(m.Message)


def _strategy(tp: typing.Any) -> st.SearchStrategy[typing.Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of(*[_strategy(a) for a in typing.get_args(tp)])
    if origin is list:
        return st.lists(_strategy(typing.get_args(tp)[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False), max_size=3)
    if tp is type(None):
        return st.none()
    if tp is str:
        return st.text(max_size=40)
    if tp is int:
        return st.integers(min_value=-(2**40), max_value=2**40)
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is bool:
        return st.booleans()
    if tp is bytes:
        return st.binary(max_size=64)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        fields = {f: _strategy(hints[f]) for f in tp.__struct_fields__}
        return st.builds(tp, **fields)
    raise TypeError(tp)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.__name__)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(kind: type[m.Msg], data: st.DataObject) -> None:
    msg = data.draw(_strategy(kind))
    assert codec.decode_frame(codec.encode_frame(msg)) == msg
    assert codec.decode_body(codec.encode_body(msg)) == msg


def test_golden_bytes_of_a_request_are_stable() -> None:
    # Guards wire compatibility: a change here breaks peers running the previous release.
    msg = m.RenewLeaseRequest(lease_id="abc")
    assert codec.encode_frame(msg) == bytes.fromhex("0100000025") + msgspec.msgpack.encode(
        {"kind": "RenewLeaseRequest", "lease_id": "abc"}
    )


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_error(data: bytes) -> None:
    with contextlib.suppress(codec.ProtocolError):
        codec.decode_frame(data)


def test_a_string_that_is_not_utf8_is_a_protocol_error() -> None:
    # msgpack fixmap{kind: "HealthRequest"} with the value's bytes broken: \xff is never UTF-8.
    body = msgspec.msgpack.encode({"kind": "HealthRequest"}).replace(b"Health", b"\xffealth")
    with pytest.raises(codec.ProtocolError, match="malformed"):
        codec.decode_body(body)


def test_limits_and_versions() -> None:
    big = m.TaskStatus(task_id="t", job_id="j", state="failed", detail="x" * 40_000)
    with pytest.raises(codec.ProtocolError, match="limit"):
        codec.encode_frame(big)
    with pytest.raises(codec.ProtocolError, match="version"):
        codec.parse_header(codec.HEADER.pack(2, 10))
    with pytest.raises(codec.ProtocolError, match="exceeds"):
        codec.parse_header(codec.HEADER.pack(codec.PROTOCOL_VERSION, codec.MAX_FRAME_BYTES + 1))
    with pytest.raises(codec.ProtocolError, match="expected Ack"):
        codec.expect(m.Done(), m.Ack)
    wrong = msgspec.msgpack.encode({"kind": "RenewLeaseRequest", "lease_id": 5})
    with pytest.raises(codec.ProtocolError, match="malformed"):
        codec.decode_body(wrong)


def test_hypha_protocol_error_is_caught_by_either_name() -> None:
    from hypha.errors import HyphaError, ProtocolError

    with pytest.raises(codec.ProtocolError):
        raise ProtocolError("x")
    assert issubclass(ProtocolError, HyphaError)
