"""Fill locks shared by worker processes, and mirroring a sibling's fill (real files, real
flock: two opens of one lock file conflict even within one process, as two workers do)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio

from proxychain.coalesce import Fill, FillFailed, FillRegistry
from proxychain.disk import DiskTier, open_disk_tier
from proxychain.entry import Entry
from proxychain.http import Headers, ResponseHead
from proxychain.siblingfill import HeldLead, SiblingFills
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


async def follow(
    fill: Fill, into: list[bytes], *, reached: tuple[int, trio.Event] | None = None
) -> None:
    """Follow ``fill`` into ``into``; ``reached`` is set once that many bytes came."""
    await fill.wait_head()
    file = fill.open_follower()
    assert file is not None
    with file:
        async for piece in fill.follow(file):
            into.append(piece)
            if reached is not None and sum(map(len, into)) >= reached[0]:
                reached[1].set()


def lead_a_fill(tmp_path: Path) -> tuple[SiblingFills, HeldLead, FillRegistry, Fill]:
    """A sibling's lead on ``KEY`` and the local fill that mirrors it."""
    siblings = SiblingFills(tmp_path / "fills")
    lead = siblings.lead(KEY)
    assert lead is not None
    registry = FillRegistry()
    return siblings, lead, registry, registry.start(KEY)


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
    siblings, lead, registry, fill = lead_a_fill(tmp_path)
    leader = new_store(disk)
    got: list[bytes] = []
    first_part = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(siblings.mirror, fill, new_store(disk), registry)
        nursery.start_soon(partial(follow, fill, got, reached=(5000, first_part)))
        writer = await leader.open_writer(KEY, "")
        lead.announce(HEAD, Entry(key=KEY, url="/a"), writer.tmp_path)
        await writer.write(BODY[:5000])
        with trio.fail_after(5):
            await first_part.wait()  # the follower has the first part before the rest
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
    siblings, lead, registry, fill = lead_a_fill(tmp_path)
    got: list[bytes] = []
    some = trio.Event()
    with pytest.RaisesGroup(FillFailed):
        async with trio.open_nursery() as nursery:
            await nursery.start(siblings.mirror, fill, new_store(disk), registry)
            nursery.start_soon(partial(follow, fill, got, reached=(1, some)))
            writer = await new_store(disk).open_writer(KEY, "")
            lead.announce(HEAD, Entry(key=KEY, url="/a"), writer.tmp_path)
            await writer.write(BODY[:5000])
            with trio.fail_after(5):
                await some.wait()
            await writer.abort()  # the upstream broke off: nothing is stored
            lead.release()
    assert 0 < sum(map(len, got)) < len(BODY)
    assert fill.state.failed


async def test_a_fill_released_unannounced_ends_with_what_the_store_holds(
    disk: DiskTier, tmp_path: Path
) -> None:
    # A 304, a buffered package fill or a commit that renamed the temp file before the
    # mirror opened it: the waiters are served what the sibling stored.
    siblings, lead, registry, fill = lead_a_fill(tmp_path)
    leader = new_store(disk)
    async with trio.open_nursery() as nursery:
        # Started: the mirror has noted what the store held before the fill.
        await nursery.start(siblings.mirror, fill, new_store(disk), registry)
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
    store = new_store(disk)
    writer = await store.open_writer(KEY, "")
    await writer.write(BODY)
    await writer.commit(Entry(key=KEY, url="/a", response_time=1.0))
    siblings, lead, registry, fill = lead_a_fill(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(siblings.mirror, fill, new_store(disk), registry)
        lead.release()
    assert fill.state.failed
    assert not fill.state.finished


async def test_a_fill_released_with_nothing_stored_fails_without_an_error(
    disk: DiskTier, tmp_path: Path
) -> None:
    siblings, lead, registry, fill = lead_a_fill(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(siblings.mirror, fill, new_store(disk), registry)
        lead.release()
    # The waiters fetch on their own: no upstream error to share, no entry to serve.
    assert fill.state.failed
    assert fill.state.error is None
    assert registry.get(KEY) is None
