"""Worker pools in virtual time: filling, replacing, the grace period, renewals.

Runs on trio's ``MockClock`` (pytest-trio's ``autojump_clock``) with a ``FakeLeaser``, so
every deadline here is exact: nothing depends on how loaded the machine is.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from hypha.errors import JobError, hypha_leaf
from hypha.resources import Resources
from hypha.scheduler.allocator import Price, WorkerSpec
from hypha.scheduler.pool import Pool, PoolSpec
from hypha.testing.cluster import wait_until
from hypha.testing.fakes import FakeLeaser

WORKER = WorkerSpec(resources=Resources(cpu=1), executors=())


def spec(min_: int = 1, target: int = 2, grace: float = 30.0) -> PoolSpec:
    return PoolSpec("trainers", WORKER, Price(1.0, 10.0), min=min_, target=target, grace_seconds=grace)


async def test_pool_fills_replaces_a_lost_member_and_keeps_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leaser = FakeLeaser(["w1", "w2", "w3"])
    pool = Pool(spec(), leaser)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_size(2)
        assert set(pool.workers()) == {"w1", "w2"}
        lost_lease = pool.members["w1"].lease_id
        version = pool.version
        leaser.end("w1", "renewal not answered")
        await pool.wait_changed(version)
        assert "w1" not in pool.members
        assert pool.loss_reason(lost_lease) == "renewal not answered"
        await pool.wait_size(2)
        assert set(pool.workers()) == {"w2", "w3"}
        stats = pool.statistics()
        assert (stats.num_joined, stats.num_lost, stats.num_members) == (3, 1, 2)
        nursery.cancel_scope.cancel()
    assert sorted(leaser.released) == ["w2", "w3"]  # leases given back when the pool stops


async def test_pool_below_minimum_fails_exactly_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leaser = FakeLeaser(["w1"])
    pool = Pool(spec(min_=1, target=1, grace=30.0), leaser)
    started = trio.current_time()
    lost_at: list[float] = []

    async def lose_the_only_member() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await pool.wait_size(1)
            lost_at.append(trio.current_time())
            leaser.end("w1", "lease gone")  # no worker left to replace it

    with pytest.raises(BaseExceptionGroup) as raised:
        await lose_the_only_member()
    leaf = hypha_leaf(raised.value)
    assert isinstance(leaf, JobError)
    assert "below its minimum" in str(leaf)
    failed_after = trio.current_time() - lost_at[0]
    assert 30.0 < failed_after <= 30.0 + spec().retry_seconds + 1e-9
    assert trio.current_time() - started >= 30.0


async def test_pool_recovering_within_the_grace_does_not_fail(autojump_clock: trio.testing.MockClock) -> None:
    leaser = FakeLeaser(["w1"])
    pool = Pool(spec(min_=1, target=1, grace=30.0), leaser)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_size(1)
        leaser.end("w1", "lease gone")
        await trio.sleep(20.0)  # virtual time: below the minimum for 20 of 30 s
        leaser.available.append("w9")
        await pool.wait_size(1)
        await trio.sleep(60.0)  # well past the grace: still running, since it recovered
        assert pool.workers() == ["w9"]
        assert pool.statistics().below_min_since is None
        nursery.cancel_scope.cancel()


async def test_renewal_moves_the_expiry_and_wakes_followers(autojump_clock: trio.testing.MockClock) -> None:
    leaser = FakeLeaser(["w1"], lease_seconds=10.0)
    pool = Pool(spec(min_=1, target=1), leaser)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_size(1)
        first_expiry = pool.members["w1"].expires_at
        version = pool.version
        await trio.sleep(7.5)
        leaser.renew("w1")
        await pool.wait_changed(version)
        assert pool.members["w1"].expires_at == pytest.approx(first_expiry + 7.5)
        assert pool.statistics().num_renewals == 1
        nursery.cancel_scope.cancel()


async def test_revoked_member_is_lost_at_once_and_never_leased_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leaser = FakeLeaser(["w1", "w2"])
    pool = Pool(spec(min_=1, target=2), leaser)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_size(2)
        lease = pool.members["w1"].lease_id
        await pool.peer_revoked("w1")
        assert "w1" not in pool.members
        assert pool.loss_reason(lease) == "its certificate was revoked"
        leaser.available.append("w1")  # the revoked worker offers itself again
        rounds = leaser.num_allocations
        with trio.fail_after(10 * spec().retry_seconds):  # several reconcile rounds
            await wait_until(lambda: leaser.num_allocations >= rounds + 3)
        assert pool.workers() == ["w2"]
        leaser.available.append("w3")
        await pool.wait_size(2)
        assert set(pool.workers()) == {"w2", "w3"}
        assert leaser.available == ["w1"]
        await pool.peer_revoked("w9")  # not a member: nothing changes
        assert pool.statistics().num_lost == 1
        nursery.cancel_scope.cancel()
