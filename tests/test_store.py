"""Memory tier and the two-tier Store: byte budget, per-object cap, promotion, purge."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proxychain.disk import DiskTier, LoadedLookup, open_disk_tier
from proxychain.entry import Entry
from proxychain.http import Headers
from proxychain.store import (
    ENTRY_OVERHEAD_BYTES,
    MemoryStatistics,
    MemoryTier,
    Store,
    Stored,
)

MiB = 1 << 20
CAP = 100  # memory per-object cap in these tests


def hexkey(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


KEY = hexkey("GET /a")
V1, V2, V3 = hexkey("v1"), hexkey("v2"), hexkey("v3")


def entry(key: str = KEY, variant: str = "", body: bytes = b"", **kw: Any) -> Entry:
    return Entry(
        key=key,
        variant=variant,
        body_size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        **kw,
    )


# ---- MemoryTier (sync) -----------------------------------------------------------------------

UNIT = ENTRY_OVERHEAD_BYTES + 100  # one 100-byte body with no headers


def test_memory_size_accounts_body_headers_and_overhead() -> None:
    memory = MemoryTier(max_bytes=10 * UNIT, object_max=CAP)
    assert memory.put(entry(headers=Headers([("ab", "cde")])), b"x" * 10)
    assert memory.statistics().bytes == 10 + 5 + ENTRY_OVERHEAD_BYTES


def test_memory_lru_order_and_budget() -> None:
    memory = MemoryTier(max_bytes=3 * UNIT, object_max=CAP)
    keys = [hexkey(n) for n in "abcd"]
    for key in keys[:3]:
        assert memory.put(entry(key), b"x" * 100)
    assert len(memory.get(keys[0])) == 1  # a is now the most recently used
    assert memory.put(entry(keys[3]), b"x" * 100)  # evicts b
    assert [len(memory.get(k)) for k in keys] == [1, 0, 1, 1]
    assert memory.statistics() == MemoryStatistics(
        bytes=3 * UNIT,
        entries=3,
        keys=3,
        max_bytes=3 * UNIT,
        object_max=CAP,
        evictions=1,
        hits=4,
        misses=1,
    )


def test_memory_evicts_variants_of_a_key_together() -> None:
    memory = MemoryTier(max_bytes=3 * UNIT, object_max=CAP)
    memory.put(entry(variant=V1), b"x" * 100)
    memory.put(entry(variant=V2), b"y" * 100)
    assert memory.variants(KEY) == {V1, V2}
    memory.put(entry(hexkey("b")), b"z" * 100)
    memory.put(entry(hexkey("c")), b"z" * 100)  # needs room: KEY's two variants go together
    assert memory.get(KEY) == []
    assert memory.statistics().evictions == 2


@pytest.mark.parametrize(("size", "stored"), [(0, True), (CAP, True), (CAP + 1, False)])
def test_memory_per_object_cap(size: int, stored: bool) -> None:
    memory = MemoryTier(max_bytes=10 * UNIT, object_max=CAP)
    memory.put(entry(), b"old")
    assert memory.put(entry(), b"x" * size) is stored
    assert memory.get(KEY) == ([(entry(), b"x" * size)] if stored else [])


def test_memory_rejects_cap_above_budget() -> None:
    with pytest.raises(ValueError):
        MemoryTier(max_bytes=10, object_max=11)


def test_memory_update_meta_and_remove() -> None:
    memory = MemoryTier(max_bytes=10 * UNIT, object_max=CAP)
    a1, a2 = entry(variant=V1, body=b"one"), entry(variant=V2, body=b"two")
    memory.put(a1, b"one")
    memory.put(a2, b"two")
    fresher = a1.replace(response_time=5.0)
    memory.update_meta(fresher)  # same body: metadata replaced
    memory.update_meta(entry(variant=V2, body=b"other"))  # another body: variant dropped
    assert memory.get(KEY) == [(fresher, b"one")]
    memory.put(a2, b"two")
    assert memory.remove(KEY, V2) == 1
    assert memory.remove(KEY, V2) == 0
    memory.put(a2, b"two")
    assert memory.remove(KEY) == 2
    assert memory.statistics().bytes == 0


# ---- Store over a real disk tier -------------------------------------------------------------


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[DiskTier]:
    async with open_disk_tier(tmp_path, max_bytes=MiB, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        yield tier


def new_store(disk: DiskTier) -> Store:
    return Store(MemoryTier(max_bytes=100 * UNIT, object_max=CAP), disk)


async def fill(store: Store, key: str, body: bytes, variant: str = "", url: str = "/a") -> Entry:
    writer = await store.open_writer(key, variant)
    for start in range(0, len(body), 7):
        await writer.write(body[start : start + 7])
    return await writer.commit(Entry(key=key, variant=variant, url=url))


async def body_of(store: Store, stored: Stored, chunk_size: int = 1 << 20) -> list[bytes]:
    return [chunk async for chunk in store.open_body(stored, chunk_size=chunk_size)]


async def test_small_fill_is_held_in_memory(disk: DiskTier) -> None:
    store = new_store(disk)
    committed = await fill(store, KEY, b"small body")
    [stored] = await store.lookup(KEY)
    assert stored == Stored(entry=committed, tier="memory", body=b"small body")
    assert await body_of(store, stored, chunk_size=4) == [b"smal", b"l bo", b"dy"]
    assert store.statistics().memory.hits == 1


async def test_large_fill_streams_from_disk(disk: DiskTier) -> None:
    store = new_store(disk)
    body = bytes(range(256)) * 2  # over the cap
    committed = await fill(store, KEY, body)
    [stored] = await store.lookup(KEY)
    assert stored == Stored(entry=committed, tier="disk", body=None)
    assert b"".join(await body_of(store, stored, chunk_size=100)) == body
    assert len(await body_of(store, stored, chunk_size=100)) == 6
    assert store.statistics().memory.entries == 0


async def test_disk_hit_promoted_after_verification(disk: DiskTier) -> None:
    committed = await fill(new_store(disk), KEY, b"promote me")
    store = new_store(disk)  # another process, or a restart: empty memory
    [stored] = await store.lookup(KEY)
    # This request read it from disk; the next one finds it in memory.
    assert stored == Stored(entry=committed, tier="disk", body=b"promote me")
    assert store.statistics().promotions == 1
    assert store.memory.get(KEY) == [(committed, b"promote me")]


async def test_tampered_disk_body_dropped_on_promotion(
    disk: DiskTier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    committed = await fill(new_store(disk), KEY, b"genuine")
    body_file = tmp_path / "objects" / KEY[:2] / KEY / f"_.{committed.sha256}.body"
    body_file.write_bytes(b"GENUINE")  # same size, other bytes
    caplog.set_level(logging.WARNING, logger="proxychain.disk")
    store = new_store(disk)
    assert await store.lookup(KEY) == []
    stats = store.statistics()
    assert (stats.promotions, stats.promotion_failures, stats.disk.corrupt_dropped) == (0, 1, 1)
    assert not body_file.exists()
    assert await disk.lookup(KEY) == []
    meta = body_file.parent / "_.meta"
    assert [r.getMessage() for r in caplog.records] == [
        f"dropped corrupt cache entry {meta}: body does not match its recorded sha256"
    ]


async def test_promotion_is_all_or_nothing(disk: DiskTier) -> None:
    store = new_store(disk)
    await fill(store, KEY, b"small", variant=V1)
    await fill(store, KEY, b"L" * (CAP + 1), variant=V2)
    fresh = new_store(disk)
    found = await fresh.lookup(KEY)
    assert sorted((s.entry.variant, s.tier, s.body) for s in found) == sorted(
        [(V1, "disk", None), (V2, "disk", None)]
    )
    assert fresh.memory.get(KEY) == []


async def test_commit_keeps_memory_complete_per_key(disk: DiskTier) -> None:
    store = new_store(disk)
    await fill(store, KEY, b"one", variant=V1)
    assert store.memory.variants(KEY) == {V1}
    await fill(new_store(disk), KEY, b"two", variant=V2)  # another process adds a variant
    await fill(store, KEY, b"three", variant=V3)
    assert store.memory.variants(KEY) == frozenset()  # V2 unknown to memory: key left it
    found = await store.lookup(KEY)
    assert {(s.entry.variant, s.tier) for s in found} == {
        (V1, "disk"),
        (V2, "disk"),
        (V3, "disk"),
    }
    await fill(store, KEY, b"one again", variant=V1)
    assert store.memory.variants(KEY) == {V1, V2, V3}
    await fill(store, KEY, b"L" * (CAP + 1), variant=V1)  # too big now: key leaves memory
    assert store.memory.variants(KEY) == frozenset()


async def test_update_meta_both_tiers(disk: DiskTier) -> None:
    store = new_store(disk)
    committed = await fill(store, KEY, b"body")
    fresher = committed.replace(response_time=42.0)
    await store.update_meta(fresher)
    assert [s.entry for s in await store.lookup(KEY)] == [fresher]
    assert await disk.lookup(KEY) == [fresher]


async def test_remove_both_tiers(disk: DiskTier) -> None:
    store = new_store(disk)
    await fill(store, KEY, b"a", variant=V1)
    await fill(store, KEY, b"b", variant=V2)
    assert await store.remove(KEY, V1) == 1
    assert [s.entry.variant for s in await store.lookup(KEY)] == [V2]
    assert await store.remove(KEY) == 1
    assert await store.lookup(KEY) == []


async def test_purge_prefix_across_tiers(disk: DiskTier) -> None:
    store = new_store(disk)
    await fill(store, hexkey("1"), b"small", url="/go/a/@v/list")
    await fill(store, hexkey("2"), b"L" * 500, url="/go/b/@v/v1.zip")
    await fill(store, hexkey("3"), b"keep", url="/gopher")
    await fill(store, hexkey("4"), b"keep", url="/pypi/go/")
    assert await store.purge_prefix("/go/") == 2
    assert [len(await store.lookup(hexkey(n))) for n in "1234"] == [0, 0, 1, 1]
    assert store.statistics().memory.entries == 2
    assert store.statistics().disk.entries == 2


async def test_writer_abort_and_rejects_bad_keys(disk: DiskTier, tmp_path: Path) -> None:
    store = new_store(disk)
    async with await store.open_writer(KEY, "") as writer:
        await writer.write(b"partial")
        assert writer.tmp_path.read_bytes() == b"partial"
        assert writer.bytes_written == 7
    assert list((tmp_path / "tmp").iterdir()) == []
    assert await store.lookup(KEY) == []
    with pytest.raises(ValueError):
        await store.open_writer("../etc", "")
    with pytest.raises(ValueError):
        await store.lookup("NOTHEX")


async def test_touch_on_memory_hit_keeps_entry_on_disk(tmp_path: Path) -> None:
    body = b"x" * 50
    async with open_disk_tier(tmp_path / "c", max_bytes=MiB, rescan_interval=None) as probe:
        await probe.wait_index_ready()
        await fill(Store(MemoryTier(max_bytes=MiB, object_max=CAP), probe), KEY, body)
        size = probe.statistics().bytes
    async with open_disk_tier(tmp_path / "d", max_bytes=2 * size, rescan_interval=None) as disk:
        await disk.wait_index_ready()
        store = new_store(disk)
        hot = await fill(store, hexkey("hot"), body)
        await fill(store, hexkey("warm"), body)
        [stored] = await store.lookup(hot.key)
        assert stored.tier == "memory"
        store.touch(stored)  # served from memory: disk LRU must hear of it
        await fill(store, hexkey("new"), body)
        assert [bool(await disk.lookup(hexkey(n))) for n in ("hot", "warm", "new")] == [
            True,
            False,
            True,
        ]


async def test_concurrent_lookups_of_one_key_share_one_disk_lookup(
    disk: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = await fill(new_store(disk), KEY, bytes(range(256)) * 2)  # over the cap
    store = new_store(disk)
    calls: list[str] = []
    release = trio.Event()
    real_lookup = disk.lookup_loaded

    async def slow_lookup(key: str, load_max: int) -> LoadedLookup:
        calls.append(key)
        await release.wait()
        return await real_lookup(key, load_max)

    monkeypatch.setattr(disk, "lookup_loaded", slow_lookup)
    results: list[list[Stored]] = []

    async def look() -> None:
        results.append(await store.lookup(KEY))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(look)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert calls == [KEY]
    assert results == [[Stored(entry=committed, tier="disk")]] * 5
    await store.lookup(KEY)  # the next lookup asks the disk again
    assert calls == [KEY, KEY]


async def test_a_failed_shared_lookup_leaves_each_waiter_to_its_own(
    disk: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(disk)
    calls: list[str] = []
    release = trio.Event()

    async def failing_then_empty(key: str, load_max: int) -> LoadedLookup:
        calls.append(key)
        if len(calls) == 1:
            await release.wait()
            raise OSError("disk gone")
        return LoadedLookup([], None, 0)

    monkeypatch.setattr(disk, "lookup_loaded", failing_then_empty)
    outcomes: list[object] = []

    async def look() -> None:
        try:
            outcomes.append(await store.lookup(KEY))
        except OSError as exc:
            outcomes.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(look)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert sorted(map(str, outcomes)) == ["[]", "[]", "disk gone"]
    assert calls == [KEY, KEY, KEY]
