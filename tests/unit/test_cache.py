"""SliceCache with real local fetchers: hits, shared fetches, eviction, bad bytes, prefetch."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from hypha.data.cache import SliceCache, SliceRef
from hypha.errors import TransferError


class CopyFetcher:
    """Copies slices from a directory; counts calls, can corrupt or fail, can wait on a gate."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls: Counter[tuple[str, int]] = Counter()
        self.gate: trio.Event | None = None
        self.num_corrupt = 0
        self.num_failures = 0

    async def __call__(self, ref: SliceRef, destination: Path) -> None:
        self.calls[ref.key] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.num_failures > 0:
            self.num_failures -= 1
            destination.write_bytes(b"partial")
            raise OSError("connection reset")
        await trio.to_thread.run_sync(shutil.copyfile, self.source / f"{ref.index}.bin", destination)
        if self.num_corrupt > 0:
            self.num_corrupt -= 1
            data = bytearray(destination.read_bytes())
            data[len(data) // 2] ^= 0xFF
            destination.write_bytes(bytes(data))

    @property
    def num_calls(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def refs(tmp_path: Path) -> list[SliceRef]:
    source = tmp_path / "source"
    source.mkdir()
    rng = random.Random(0)
    result = []
    for index in range(6):
        data = rng.randbytes(1000 + index)
        (source / f"{index}.bin").write_bytes(data)
        result.append(SliceRef("toy", index, hashlib.sha256(data).hexdigest(), len(data)))
    return result


@pytest.fixture
def fetcher(tmp_path: Path, refs: list[SliceRef]) -> CopyFetcher:
    return CopyFetcher(tmp_path / "source")


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0)


async def test_miss_then_hit(tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=4, fetch=fetcher)
    path = await cache.get(refs[1])
    assert path == tmp_path / "cache" / "toy" / f"00001-{refs[1].sha256[:8]}.safetensors"
    assert path.read_bytes() == (tmp_path / "source" / "1.bin").read_bytes()
    assert cache.contains(refs[1])
    assert await cache.get(refs[1]) == path
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.fetches) == (1, 1, 1)
    assert stats.bytes_fetched == refs[1].size
    assert stats.num_cached == 1
    assert fetcher.calls == {("toy", 1): 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.hits = 5  # type: ignore[misc]


async def test_concurrent_gets_share_one_fetch(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=4, fetch=fetcher)
    fetcher.gate = trio.Event()
    paths: list[Path] = []

    async def get() -> None:
        paths.append(await cache.get(refs[0]))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher.num_calls == 1
        fetcher.gate.set()
    assert len(set(paths)) == 1
    assert len(paths) == 5
    stats = cache.statistics()
    assert (stats.fetches, stats.misses, stats.hits) == (1, 5, 0)


async def test_lru_eviction_order(tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher) -> None:
    root = tmp_path / "cache"
    cache = SliceCache(root, capacity=2, fetch=fetcher)
    a, b, c = refs[:3]
    path_a = await cache.get(a)
    path_b = await cache.get(b)
    await cache.get(a)  # a becomes the most recently used
    path_c = await cache.get(c)
    assert not path_b.exists()
    assert path_a.exists()
    assert path_c.exists()
    assert [cache.contains(r) for r in (a, b, c)] == [True, False, True]
    assert cache.statistics().evictions == 1
    assert len(cache_files(root)) == 2


async def test_pinned_slice_is_not_evicted(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=1, fetch=fetcher)
    async with cache.open(refs[0]) as pinned:
        other = await cache.get(refs[1])
        assert pinned.exists()
        assert other.exists()  # over capacity while the pin lasts
        assert cache.statistics().num_cached == 2
    assert not pinned.exists()
    assert other.exists()
    assert cache.statistics().evictions == 1


async def test_corrupted_fetch_is_rejected(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    root = tmp_path / "cache"
    cache = SliceCache(root, capacity=4, fetch=fetcher)
    fetcher.num_corrupt = 1
    with pytest.raises(TransferError, match="bytes refused"):
        await cache.get(refs[2])
    assert not cache.contains(refs[2])
    assert cache_files(root) == []
    assert cache.statistics().verify_failures == 1
    path = await cache.get(refs[2])
    assert path.read_bytes() == (tmp_path / "source" / "2.bin").read_bytes()
    assert cache.statistics().fetches == 2


async def test_wrong_size_is_rejected(tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=4, fetch=fetcher)
    wrong = dataclasses.replace(refs[0], size=refs[0].size + 1)  # type: ignore[operator]
    with pytest.raises(TransferError):
        await cache.get(wrong)
    assert cache.statistics().verify_failures == 1


async def test_fetch_error_becomes_transfer_error_and_leaves_no_file(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    root = tmp_path / "cache"
    cache = SliceCache(root, capacity=4, fetch=fetcher)
    fetcher.num_failures = 1
    with pytest.raises(TransferError, match="connection reset") as info:
        await cache.get(refs[0])
    assert isinstance(info.value.__cause__, OSError)
    assert cache_files(root) == []
    await cache.get(refs[0])


async def test_shared_fetch_failure_reaches_every_waiter(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=4, fetch=fetcher)
    fetcher.gate = trio.Event()
    fetcher.num_corrupt = 1
    errors: list[Exception] = []

    async def get() -> None:
        try:
            await cache.get(refs[0])
        except TransferError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        fetcher.gate.set()
    assert len(errors) == 3
    assert fetcher.num_calls == 1


async def test_cancelled_fetcher_hands_over_to_waiter(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    root = tmp_path / "cache"
    cache = SliceCache(root, capacity=4, fetch=fetcher)
    fetcher.gate = trio.Event()
    results: list[Path] = []

    async def waiter() -> None:
        results.append(await cache.get(refs[0]))

    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def cancelled_get() -> None:
            with first:
                await cache.get(refs[0])

        nursery.start_soon(cancelled_get)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher.num_calls == 2  # the waiter started its own fetch
        fetcher.gate.set()
    assert results[0].exists()
    assert [p.name for p in (root / "toy").iterdir()] == [results[0].name]


async def test_prefetch_fills_the_cache(tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=4, fetch=fetcher, prefetch_depth=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert cache.prefetch(refs[:4]) == 2
        await wait_until(lambda: cache.contains(refs[0]) and cache.contains(refs[1]))
        assert not cache.contains(refs[2])
        assert cache.prefetch(refs[:2]) == 0  # already cached
        await cache.get(refs[0])
        await cache.get(refs[1])
        stats = cache.statistics()
        assert (stats.hits, stats.misses, stats.fetches) == (2, 0, 2)
        nursery.cancel_scope.cancel()


async def test_prefetch_failure_is_logged_not_raised(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    cache = SliceCache(tmp_path / "cache", capacity=4, fetch=fetcher, prefetch_depth=1)
    fetcher.num_corrupt = 1
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert cache.prefetch([refs[3]]) == 1
        await wait_until(lambda: cache.statistics().verify_failures == 1)
        assert cache.prefetch([refs[3]]) == 1
        await wait_until(lambda: cache.contains(refs[3]))
        nursery.cancel_scope.cancel()


async def test_restart_reuses_verified_files(
    tmp_path: Path, refs: list[SliceRef], fetcher: CopyFetcher
) -> None:
    root = tmp_path / "cache"
    first = SliceCache(root, capacity=4, fetch=fetcher)
    await first.get(refs[0])
    tampered = await first.get(refs[1])
    tampered.write_bytes(b"tampered")
    (root / "toy" / ".00009-deadbeef.1.part").write_bytes(b"left over")

    second = SliceCache(root, capacity=4, fetch=fetcher)
    assert second.statistics().num_cached == 2
    assert not (root / "toy" / ".00009-deadbeef.1.part").exists()
    await second.get(refs[0])
    assert fetcher.calls[refs[0].key] == 1  # verified, not fetched again
    path = await second.get(refs[1])
    assert fetcher.calls[refs[1].key] == 2
    assert path.read_bytes() == (tmp_path / "source" / "1.bin").read_bytes()
    assert second.statistics().hits == 1


def test_slice_ref_validation() -> None:
    good = "0" * 64
    assert SliceRef("ds", 0, good).key == ("ds", 0)
    with pytest.raises(ValueError, match="dataset"):
        SliceRef("../x", 0, good)
    with pytest.raises(ValueError, match="index"):
        SliceRef("ds", -1, good)
    with pytest.raises(ValueError, match="sha256"):
        SliceRef("ds", 0, "ABC")
    with pytest.raises(ValueError, match="capacity"):
        SliceCache(Path("unused"), capacity=0, fetch=CopyFetcher(Path("unused")))
