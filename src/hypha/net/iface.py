"""The narrow view of a node that the scheduler's components need: requests, handlers, gossip.

``hypha.net.host.Node`` satisfies these protocols; ``hypha.testing.fakes`` implements them
in memory so that allocation, leases and pools can be unit-tested in virtual time (trio's
``MockClock``) without sockets. Nothing here touches py-libp2p.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from hypha.protocol import ids
from hypha.protocol import messages as m

M = TypeVar("M", bound=m.Msg)


class Settings(Protocol):
    @property
    def rpc_timeout_seconds(self) -> float: ...


class Registrar(Protocol):
    def register(
        self,
        kind: type[M],
        handler: Callable[[str, M], Awaitable[m.Msg]],
        *,
        roles: set[str] | None = None,
    ) -> None: ...


class Publisher(Protocol):
    async def publish(self, topic: str, msg: Any) -> None: ...


class Network(Protocol):
    """A node as the allocator and the job driver use it."""

    @property
    def peer_id(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def rpc(self) -> Registrar: ...

    @property
    def gossip(self) -> Publisher: ...

    def listen_addrs(self) -> list[str]: ...

    async def request(
        self,
        peer_id: str,
        msg: m.Msg,
        expect: type[M],
        protocol: str = ids.API_PROTOCOL,
        *,
        timeout_seconds: float | None = None,
    ) -> M: ...
