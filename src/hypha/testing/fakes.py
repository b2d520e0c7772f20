"""In-memory fakes of the narrow seams, for unit tests that run in virtual time.

``FakeHub`` joins ``FakeNode``s that implement ``hypha.net.iface.Network``: a request runs
the target node's registered handler directly (with the same role check and the same
``RemoteError``/``RequestTimeoutError`` a real node gives), gossip goes to every
subscriber. There are no sockets and no threads, so trio's ``MockClock`` drives leases,
renewals and deadlines deterministically. ``FakeRpcNode`` is the smaller seam a single component registers on:
its handlers, called directly, and the revocation callbacks. ``FakeLeaser`` stands in for
the allocator behind a ``Pool``. Real-loopback tests cover the same features with real nodes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from hypha.errors import (
    HyphaError,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    RequestTimeoutError,
    wire_code,
)
from hypha.protocol import codes, ids
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Grant, Price, WorkerSpec
from hypha.scheduler.pool import RenewHook

M = TypeVar("M", bound=m.Msg)
Handler = Callable[[str, Any], Awaitable[m.Msg]]
OnPeerRevoked = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class FakeSettings:
    rpc_timeout_seconds: float = 5.0


@dataclass
class FakeRpc:
    routes: dict[type[m.Msg], tuple[Handler, frozenset[str] | None]] = field(default_factory=dict)

    def register(
        self,
        kind: type[M],
        handler: Callable[[str, M], Awaitable[m.Msg]],
        *,
        roles: set[str] | None = None,
    ) -> None:
        if kind in self.routes:
            raise ValueError(f"{kind.__name__} already has a handler on this node")
        self.routes[kind] = (handler, frozenset(roles) if roles is not None else None)


class FakeGossip:
    def __init__(self, hub: FakeHub, origin: str) -> None:
        self._hub = hub
        self._origin = origin

    async def publish(self, topic: str, msg: Any) -> None:
        for send in list(self._hub.subscribers.get(topic, [])):
            try:
                send.send_nowait((self._origin, msg))
            except (trio.WouldBlock, trio.BrokenResourceError):
                pass  # gossip may drop, as the real one may


class FakeNode:
    """One peer on a ``FakeHub``; satisfies ``hypha.net.iface.Network``."""

    def __init__(self, hub: FakeHub, peer_id: str, role: str) -> None:
        self.hub = hub
        self.peer_id = peer_id
        self.role = role
        self.settings = FakeSettings()
        self.rpc = FakeRpc()
        self.gossip = FakeGossip(hub, peer_id)
        self.online = True
        """False: requests to this node never get an answer (a hung or unplugged peer)."""
        self.num_requests = 0

    def listen_addrs(self) -> list[str]:
        return [f"/fake/{self.peer_id}"]

    async def request(
        self,
        peer_id: str,
        msg: m.Msg,
        expect: type[M],
        protocol: str = ids.API_PROTOCOL,
        *,
        timeout_seconds: float | None = None,
    ) -> M:
        self.num_requests += 1
        target = self.hub.nodes.get(peer_id)
        if target is None:
            raise PeerUnreachableError(f"no such peer {peer_id}")
        seconds = timeout_seconds or self.settings.rpc_timeout_seconds
        with trio.move_on_after(seconds):
            response = await target.serve(self.peer_id, msg)
            if isinstance(response, m.ErrorResponse):
                raise RemoteError(response.code, response.detail)
            if not isinstance(response, expect):
                raise ProtocolError(f"expected {expect.__name__}, got {type(response).__name__}")
            return response
        raise RequestTimeoutError(f"{type(msg).__name__} to {peer_id}: no answer within {seconds:.1f} s")

    async def serve(self, sender: str, msg: m.Msg) -> m.Msg:
        """Answer ``msg`` from ``sender`` as the real RPC server would."""
        if not self.online:
            await trio.sleep(math.inf)
        route = self.routes_for(msg)
        if route is None:
            return m.ErrorResponse(code=codes.UNSUPPORTED, detail=f"no handler for {type(msg).__name__}")
        handler, roles = route
        sender_role = self.hub.nodes[sender].role if sender in self.hub.nodes else ""
        if roles is not None and sender_role not in roles:
            return m.ErrorResponse(
                code=codes.FORBIDDEN, detail=f"{type(msg).__name__} needs role {sorted(roles)}"
            )
        try:
            return await handler(sender, msg)
        except HyphaError as exc:
            return m.ErrorResponse(code=wire_code(exc), detail=str(exc))

    def routes_for(self, msg: m.Msg) -> tuple[Handler, frozenset[str] | None] | None:
        return self.rpc.routes.get(type(msg))

    def subscribe(self, topic: str, depth: int = 64) -> trio.MemoryReceiveChannel[tuple[str, Any]]:
        send, receive = trio.open_memory_channel[tuple[str, Any]](depth)
        self.hub.subscribers.setdefault(topic, []).append(send)
        return receive


class FakeRpcNode:
    """The part of ``Node`` a component registers on (``rpc``, ``on_peer_revoked``), no network.

    ``call(peer, msg)`` runs the handler registered for ``msg``'s type as if ``peer`` sent
    it: there is no role check and no error mapping, so a handler's ``HyphaError`` reaches
    the test. ``revoke(peer)`` runs the ``on_peer_revoked`` callbacks, as the node's CRL
    watcher does once it cut ``peer``. Subclass it to add the peers' side (``request``).
    """

    def __init__(self) -> None:
        self.rpc = FakeRpc()
        self.revocation_callbacks: list[OnPeerRevoked] = []

    async def call(self, peer: str, msg: m.Msg) -> m.Msg:
        """Run the handler for ``msg`` as a request from ``peer`` and return its answer."""
        handler, _roles = self.rpc.routes[type(msg)]
        return await handler(peer, msg)

    def on_peer_revoked(self, callback: OnPeerRevoked) -> None:
        self.revocation_callbacks.append(callback)

    async def revoke(self, peer: str) -> None:
        """Tell every revocation callback that ``peer``'s certificate was revoked."""
        for callback in self.revocation_callbacks:
            await callback(peer)


@dataclass
class FakeHub:
    """The in-memory network the fake nodes share."""

    nodes: dict[str, FakeNode] = field(default_factory=dict)
    subscribers: dict[str, list[trio.MemorySendChannel[tuple[str, Any]]]] = field(default_factory=dict)

    def node(self, peer_id: str, role: str) -> FakeNode:
        node = FakeNode(self, peer_id, role)
        self.nodes[peer_id] = node
        return node


class FakeLeaser:
    """A pool's allocator with workers on tap: ``allocate`` grants from ``available``.

    A granted lease lasts until the test calls ``end(worker, reason)`` (the worker died, its
    lease lapsed); ``renew(worker)`` moves a lease's expiry as a renewal would.
    """

    def __init__(self, available: list[str], lease_seconds: float = 10.0) -> None:
        self.available = list(available)
        self.lease_seconds = lease_seconds
        self.released: list[str] = []
        self.num_allocations = 0
        self._ends: dict[str, trio.Event] = {}
        self._reasons: dict[str, str] = {}
        self._hooks: dict[str, RenewHook] = {}
        self._grants: dict[str, Grant] = {}
        self._serial = 0

    async def allocate(
        self, spec: WorkerSpec, price: Price, count: int, *, exclude: frozenset[str] = frozenset()
    ) -> list[Grant]:
        self.num_allocations += 1
        picked = [w for w in self.available if w not in exclude][:count]
        grants = []
        for worker in picked:
            self.available.remove(worker)
            self._serial += 1
            grant = Grant(
                lease_id=f"lease-{self._serial}",
                worker=worker,
                price=price.bid,
                resources=Resources(),
                lease_seconds=self.lease_seconds,
                expires_at=trio.current_time() + self.lease_seconds,
            )
            self._ends[grant.lease_id] = trio.Event()
            self._grants[worker] = grant
            grants.append(grant)
        return grants

    async def keep(self, grant: Grant, on_renewed: RenewHook | None = None) -> str:
        if on_renewed is not None:
            self._hooks[grant.lease_id] = on_renewed
        await self._ends[grant.lease_id].wait()
        return self._reasons[grant.lease_id]

    def renew(self, worker: str) -> None:
        grant = self._grants[worker]
        grant.expires_at = trio.current_time() + grant.lease_seconds
        hook = self._hooks.get(grant.lease_id)
        if hook is not None:
            hook(grant)

    def end(self, worker: str, reason: str) -> None:
        grant = self._grants.pop(worker)
        self._reasons[grant.lease_id] = reason
        self._ends[grant.lease_id].set()

    async def release(self, grant: Grant) -> None:
        self.released.append(grant.worker)
