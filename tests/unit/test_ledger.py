"""Lease ledger: unit tests with a fake clock and a Hypothesis state machine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from hypha.errors import LeaseError
from hypha.leases import LeaseKind, Ledger, ResourceLedger
from hypha.resources import Resources


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


def test_insert_get_and_expiry(clock: FakeClock) -> None:
    ledger: Ledger[str] = Ledger(clock)
    lease = ledger.insert("l1", "alice", "thing", 5.0)
    assert lease.expires_at == 105.0
    assert lease.kind is LeaseKind.TEMPORARY
    assert ledger.get("l1") == lease
    assert len(ledger) == 1
    clock.now = 104.9
    assert ledger.get("l1") is not None
    clock.now = 105.0
    assert ledger.get("l1") is None
    assert len(ledger) == 0
    assert list(ledger) == []
    assert ledger.next_expiry() == 105.0
    assert [x.lease_id for x in ledger.pop_expired()] == ["l1"]
    assert ledger.pop_expired() == []
    assert ledger.next_expiry() is None


def test_duplicate_id_rejected_until_popped(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("l1", "alice", 1, 1.0)
    with pytest.raises(LeaseError, match="exists"):
        ledger.insert("l1", "bob", 2, 1.0)
    clock.now += 2
    with pytest.raises(LeaseError, match="exists"):
        ledger.insert("l1", "bob", 2, 1.0)
    ledger.pop_expired()
    assert ledger.insert("l1", "bob", 2, 1.0).holder == "bob"


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_duration(clock: FakeClock, duration: float) -> None:
    ledger: Ledger[int] = Ledger(clock)
    with pytest.raises(ValueError, match="duration_seconds"):
        ledger.insert("l1", "alice", 1, duration)


def test_promote_then_renew(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("l1", "alice", 1, 0.5)
    with pytest.raises(LeaseError, match="temporary"):
        ledger.renew("l1", "alice", 10.0)
    with pytest.raises(LeaseError, match="not held"):
        ledger.promote("l1", "bob", 10.0)
    promoted = ledger.promote("l1", "alice", 10.0)
    assert promoted.kind is LeaseKind.RENEWABLE
    assert promoted.expires_at == 110.0
    with pytest.raises(LeaseError, match="already renewable"):
        ledger.promote("l1", "alice", 10.0)
    clock.now = 108.0
    renewed = ledger.renew("l1", "alice", 10.0)
    assert renewed.expires_at == 118.0
    with pytest.raises(LeaseError, match="not held"):
        ledger.renew("l1", "bob", 10.0)
    clock.now = 118.0
    with pytest.raises(LeaseError, match="expired"):
        ledger.renew("l1", "alice", 10.0)
    with pytest.raises(LeaseError, match="unknown"):
        ledger.renew("nope", "alice", 10.0)


def test_promote_expired_offer_fails(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("l1", "alice", 1, 0.5)
    clock.now += 0.5
    with pytest.raises(LeaseError):
        ledger.promote("l1", "alice", 10.0)


def test_remove(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("l1", "alice", 1, 5.0)
    with pytest.raises(LeaseError, match="not held"):
        ledger.remove("l1", "bob")
    removed = ledger.remove("l1", "alice")
    assert removed is not None
    assert removed.item == 1
    assert ledger.remove("l1") is None
    assert ledger.next_expiry() is None


def test_remove_expired_leaves_it_for_pop(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("l1", "alice", 1, 5.0)
    clock.now += 5
    assert ledger.remove("l1", "bob") is None
    assert [x.lease_id for x in ledger.pop_expired()] == ["l1"]


def test_pop_expired_sorted_and_partial(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("c", "alice", 1, 3.0)
    ledger.insert("a", "alice", 2, 2.0)
    ledger.insert("b", "bob", 3, 2.0)
    ledger.insert("d", "bob", 4, 10.0)
    assert ledger.next_expiry() == 102.0
    clock.now = 103.0
    assert [x.lease_id for x in ledger.pop_expired()] == ["a", "b", "c"]
    assert [x.lease_id for x in ledger] == ["d"]
    assert ledger.next_expiry() == 110.0


def test_by_holder_and_statistics(clock: FakeClock) -> None:
    ledger: Ledger[int] = Ledger(clock)
    ledger.insert("a", "alice", 1, 5.0)
    ledger.insert("b", "bob", 2, 5.0)
    ledger.insert("c", "alice", 3, 1.0, kind=LeaseKind.RENEWABLE)
    assert [x.lease_id for x in ledger.by_holder("alice")] == ["a", "c"]
    stats = ledger.statistics()
    assert (stats.num_temporary, stats.num_renewable) == (2, 1)
    clock.now += 1
    assert [x.lease_id for x in ledger.by_holder("alice")] == ["a"]
    stats = ledger.statistics()
    assert (stats.num_temporary, stats.num_renewable) == (2, 0)


def test_resource_ledger_reserve_and_free(clock: FakeClock) -> None:
    capacity = Resources(gpu=2, cpu=8, memory=32)
    ledger = ResourceLedger(capacity, clock)
    ledger.reserve("a", "s1", Resources(gpu=1, cpu=4), 1.0)
    assert ledger.free() == Resources(gpu=1, cpu=4, memory=32)
    with pytest.raises(LeaseError, match="cannot reserve"):
        ledger.reserve("b", "s2", Resources(gpu=2), 1.0)
    ledger.reserve("b", "s2", Resources(gpu=1, cpu=4, memory=32), 1.0)
    assert ledger.free().is_zero()
    # An expired reservation frees its resources before pop_expired runs.
    clock.now += 1
    assert ledger.free() == capacity
    stats = ledger.statistics()
    assert stats.free == capacity
    assert stats.capacity == capacity
    assert stats.num_temporary == 0
    assert len(ledger.pop_expired()) == 2


def test_resource_ledger_insert_is_checked(clock: FakeClock) -> None:
    ledger = ResourceLedger(Resources(cpu=1), clock)
    with pytest.raises(LeaseError, match="cannot reserve"):
        ledger.insert("a", "s1", Resources(cpu=2), 1.0, kind=LeaseKind.RENEWABLE)


# --- state machine --------------------------------------------------------------------

HOLDERS = ("alice", "bob", "carol")
CAPACITY = Resources(gpu=4, cpu=16, memory=64)
units = st.integers(min_value=0, max_value=8)
amounts = st.builds(lambda g, c, m: Resources(gpu=g / 2, cpu=c * 2, memory=m * 8), units, units, units)
durations = st.integers(min_value=1, max_value=30).map(float)


@dataclass
class ModelLease:
    holder: str
    amount: Resources
    kind: LeaseKind
    expires_at: float


class LedgerMachine(RuleBasedStateMachine):
    """Interleaves offers, accepts, rejects, renewals and time against a simple model."""

    lease_ids = Bundle("lease_ids")
    accepted = Bundle("accepted")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.ledger = ResourceLedger(CAPACITY, self.clock)
        self.model: dict[str, ModelLease] = {}
        self.gone: set[str] = set()
        self.next_id = 0

    def _live(self) -> dict[str, ModelLease]:
        return {k: v for k, v in self.model.items() if v.expires_at > self.clock.now}

    def _reserved(self) -> Resources:
        total = Resources()
        for lease in self._live().values():
            total = total + lease.amount
        return total

    @rule(target=lease_ids, holder=st.sampled_from(HOLDERS), amount=amounts, duration=durations)
    def offer(self, holder: str, amount: Resources, duration: float) -> str:
        lease_id = f"lease-{self.next_id}"
        self.next_id += 1
        fits = (self._reserved() + amount).fits_in(CAPACITY)
        if fits:
            lease = self.ledger.reserve(lease_id, holder, amount, duration)
            assert lease.expires_at == self.clock.now + duration
            self.model[lease_id] = ModelLease(holder, amount, LeaseKind.TEMPORARY, self.clock.now + duration)
        else:
            with pytest.raises(LeaseError):
                self.ledger.reserve(lease_id, holder, amount, duration)
            self.gone.add(lease_id)
        return lease_id

    def _pick_holder(self, lease_id: str, as_holder: bool, other: str) -> str:
        """The lease's real holder when ``as_holder`` (and it exists), else ``other``."""
        lease = self.model.get(lease_id)
        return lease.holder if as_holder and lease is not None else other

    @rule(
        target=accepted,
        lease_id=lease_ids,
        as_holder=st.booleans(),
        other=st.sampled_from(HOLDERS),
        duration=durations,
    )
    def accept(self, lease_id: str, as_holder: bool, other: str, duration: float) -> MultipleResults[str]:
        holder = self._pick_holder(lease_id, as_holder, other)
        lease = self._live().get(lease_id)
        if lease is None or lease.holder != holder or lease.kind is not LeaseKind.TEMPORARY:
            with pytest.raises(LeaseError):
                self.ledger.promote(lease_id, holder, duration)
            return multiple()
        promoted = self.ledger.promote(lease_id, holder, duration)
        assert promoted.kind is LeaseKind.RENEWABLE
        lease.kind = LeaseKind.RENEWABLE
        lease.expires_at = self.clock.now + duration
        return multiple(lease_id)

    @rule(
        lease_id=accepted,
        as_holder=st.booleans(),
        other=st.sampled_from(HOLDERS),
        duration=durations,
    )
    def renew(self, lease_id: str, as_holder: bool, other: str, duration: float) -> None:
        holder = self._pick_holder(lease_id, as_holder, other)
        lease = self._live().get(lease_id)
        if lease is None or lease.holder != holder or lease.kind is not LeaseKind.RENEWABLE:
            with pytest.raises(LeaseError):
                self.ledger.renew(lease_id, holder, duration)
            return
        self.ledger.renew(lease_id, holder, duration)
        lease.expires_at = self.clock.now + duration

    @rule(
        lease_id=consumes(lease_ids),
        as_holder=st.booleans(),
        other=st.sampled_from((None, *HOLDERS)),
    )
    def release(self, lease_id: str, as_holder: bool, other: str | None) -> None:
        lease = self._live().get(lease_id)
        holder = lease.holder if as_holder and lease is not None else other
        if lease is None:
            assert self.ledger.remove(lease_id, holder) is None
            return
        if holder is not None and holder != lease.holder:
            with pytest.raises(LeaseError):
                self.ledger.remove(lease_id, holder)
            return
        removed = self.ledger.remove(lease_id, holder)
        assert removed is not None
        assert removed.holder == lease.holder
        del self.model[lease_id]
        self.gone.add(lease_id)

    @rule(seconds=st.integers(min_value=0, max_value=6))
    def advance(self, seconds: int) -> None:
        self.clock.now += seconds

    @rule()
    def pop_expired(self) -> None:
        popped = self.ledger.pop_expired()
        expected = sorted(
            (k for k, v in self.model.items() if v.expires_at <= self.clock.now),
            key=lambda k: (self.model[k].expires_at, k),
        )
        assert [lease.lease_id for lease in popped] == expected
        for lease_id in expected:
            del self.model[lease_id]
            self.gone.add(lease_id)

    @invariant()
    def reservations_within_capacity(self) -> None:
        reserved = self._reserved()
        assert reserved.fits_in(CAPACITY)
        assert self.ledger.free() == CAPACITY - reserved

    @invariant()
    def live_leases_match_model(self) -> None:
        live = self._live()
        actual = {lease.lease_id: lease for lease in self.ledger}
        assert set(actual) == set(live)
        for lease_id, lease in actual.items():
            # A lease id is held by exactly one holder: the one that reserved it.
            assert lease.holder == live[lease_id].holder
            assert lease.kind is live[lease_id].kind
            assert lease.expires_at == live[lease_id].expires_at
        for holder in HOLDERS:
            assert {x.lease_id for x in self.ledger.by_holder(holder)} == {
                k for k, v in live.items() if v.holder == holder
            }

    @invariant()
    def expired_never_come_back(self) -> None:
        now = self.clock.now
        dead = self.gone | {k for k, v in self.model.items() if v.expires_at <= now}
        for lease_id in dead:
            assert self.ledger.get(lease_id) is None
            for holder in HOLDERS:
                with pytest.raises(LeaseError):
                    self.ledger.renew(lease_id, holder, 1.0)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
