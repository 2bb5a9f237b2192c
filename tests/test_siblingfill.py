"""Fill locks shared by worker processes, and mirroring a sibling's fill (real files, real
flock: two opens of one lock file conflict even within one process, as two workers do)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from proxychain.coalesce import Fill, FillFailed, FillRegistry
from proxychain.disk import DiskTier, open_disk_tier
from proxychain.entry import Entry
from proxychain.http import Headers, ResponseHead
from proxychain.siblingfill import SiblingFills
from proxychain.store import MemoryTier, Store

KEY = hashlib.sha256(b"k").hexdigest()
BODY = bytes(range(256)) * 64  # 16 KiB, over the memory cap: served from disk
HEAD = ResponseHead(status=200, headers=Headers([("content-length", str(len(BODY)))]))


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[DiskTier]:
    async with open_disk_tier(tmp_path / "cache", max_bytes=1 << 20, rescan_interval=None) as tier:
        await tier.wait_index_ready()
        yield tier


def new_store(disk: DiskTier) -> Store:
    """One worker's store: its own memory tier over the shared disk tier."""
    return Store(MemoryTier(max_bytes=1 << 20, object_max=1024), disk)


async def follow(fill: Fill, into: list[bytes]) -> None:
    await fill.wait_head()
    file = fill.open_follower()
    assert file is not None
    with file:
        async for piece in fill.follow(file):
            into.append(piece)  # noqa: PERF401 (piece by piece: the test watches it grow)


def test_a_lead_is_exclusive_until_released(tmp_path: Path) -> None:
    here, there = SiblingFills(tmp_path), SiblingFills(tmp_path)
    lead = here.lead(KEY)
    assert lead is not None
    assert there.lead(KEY) is None
    lead.release()
    lead.release()  # idempotent
    again = there.lead(KEY)
    assert again is not None
    again.release()
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_new_lead_clears_what_a_crashed_leader_announced(tmp_path: Path) -> None:
    (tmp_path / KEY).write_bytes(b'{"tmp": "/gone"}\n')  # the kernel dropped its lock
    lead = SiblingFills(tmp_path).lead(KEY)
    assert lead is not None
    assert (tmp_path / KEY).read_bytes() == b""
    lead.release()


def test_a_lock_file_name_must_be_a_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SiblingFills(tmp_path).lead("../escape")


async def test_mirror_streams_the_siblings_temp_file_and_ends_with_its_commit(
    disk: DiskTier, tmp_path: Path
) -> None:
    siblings = SiblingFills(tmp_path / "fills")
    leader, mirrored = new_store(disk), new_store(disk)
    lead = siblings.lead(KEY)
    assert lead is not None
    registry = FillRegistry()
    fill = registry.start(KEY)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(siblings.mirror, fill, mirrored, registry)
        nursery.start_soon(follow, fill, got)
        writer = await leader.open_writer(KEY, "")
        lead.announce(HEAD, Entry(key=KEY, url="/a"), writer.tmp_path)
        await writer.write(BODY[:5000])
        with trio.fail_after(5):
            while sum(map(len, got)) < 5000:  # the follower has the first part before the rest
                await trio.sleep(0.001)
        await writer.write(BODY[5000:])
        committed = await writer.commit(Entry(key=KEY, url="/a"))
        lead.release()
    assert b"".join(got) == BODY
    assert fill.state.finished
    assert not fill.state.failed
    assert fill.state.entry == committed
    assert registry.get(KEY) is None


async def test_mirror_cuts_its_followers_when_the_sibling_abandons_the_body(
    disk: DiskTier, tmp_path: Path
) -> None:
    siblings = SiblingFills(tmp_path / "fills")
    lead = siblings.lead(KEY)
    assert lead is not None
    registry = FillRegistry()
    fill = registry.start(KEY)
    got: list[bytes] = []
    with pytest.RaisesGroup(FillFailed):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(siblings.mirror, fill, new_store(disk), registry)
            nursery.start_soon(follow, fill, got)
            writer = await new_store(disk).open_writer(KEY, "")
            lead.announce(HEAD, Entry(key=KEY, url="/a"), writer.tmp_path)
            await writer.write(BODY[:5000])
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.001)
            await writer.abort()  # the upstream broke off: nothing is stored
            lead.release()
    assert 0 < sum(map(len, got)) < len(BODY)
    assert fill.state.failed


async def test_a_fill_released_unannounced_ends_with_what_the_store_holds(
    disk: DiskTier, tmp_path: Path
) -> None:
    # A 304, a buffered package fill or a commit that renamed the temp file before the
    # mirror opened it: the waiters are served what the sibling stored.
    siblings = SiblingFills(tmp_path / "fills")
    leader = new_store(disk)
    lead = siblings.lead(KEY)
    assert lead is not None
    registry = FillRegistry()
    fill = registry.start(KEY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(siblings.mirror, fill, new_store(disk), registry)
        await trio.sleep(0.02)  # the mirror has noted what the store held before the fill
        lead.announce(HEAD, Entry(key=KEY, url="/a"), tmp_path / "renamed-already.part")
        writer = await leader.open_writer(KEY, "")
        await writer.write(BODY)
        committed = await writer.commit(Entry(key=KEY, url="/a"))
        lead.release()
    assert fill.state.finished
    assert fill.state.entry == committed
    assert fill.state.head is None  # nothing was streamed from here


async def test_an_entry_stored_before_the_fill_is_not_taken_for_its_result(
    disk: DiskTier, tmp_path: Path
) -> None:
    # A stale entry made this a miss; the sibling's fill stored nothing (an error, no-store).
    siblings = SiblingFills(tmp_path / "fills")
    store = new_store(disk)
    writer = await store.open_writer(KEY, "")
    await writer.write(BODY)
    await writer.commit(Entry(key=KEY, url="/a", response_time=1.0))
    lead = siblings.lead(KEY)
    assert lead is not None
    registry = FillRegistry()
    fill = registry.start(KEY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(siblings.mirror, fill, new_store(disk), registry)
        await trio.sleep(0.02)
        lead.release()
    assert fill.state.failed
    assert not fill.state.finished


async def test_a_fill_released_with_nothing_stored_fails_without_an_error(
    disk: DiskTier, tmp_path: Path
) -> None:
    siblings = SiblingFills(tmp_path / "fills")
    lead = siblings.lead(KEY)
    assert lead is not None
    registry = FillRegistry()
    fill = registry.start(KEY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(siblings.mirror, fill, new_store(disk), registry)
        await trio.sleep(0.02)
        lead.release()
    # The waiters fetch on their own: no upstream error to share, no entry to serve.
    assert fill.state.failed
    assert fill.state.error is None
    assert registry.get(KEY) is None
