"""Request coalescing through the running proxy (issue 3, item 9): a herd makes one fetch.

Clients talk to ``Server.handle_connection`` over a zero-copy pipe (a memory channel of the very
``bytes`` objects the server writes, with back-pressure), so a thousand clients of a 10 MiB
body cost no socket and no extra copy; the origin dribbles the body over virtual time so the
herd really overlaps the fill.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proxychain.coalesce import Fill
from proxychain.http import Headers, Request, ResponseHead
from tests.fakes import Reply
from tests.test_proxy_caching import AUTOJUMP_THRESHOLD, Got, Harness, open_harness

KIB = 1024
MIB = 1024 * KIB
HERD = 1000  # concurrent clients
BODY_SIZE = 10 * MIB
CHUNK = 256 * KIB  # the origin sends the body in pieces of this size...
CHUNK_DELAY = 0.05  # ...one every this many (virtual) seconds
FILL_TIME = BODY_SIZE // CHUNK * CHUNK_DELAY  # seconds until the origin sent the last byte
REQUEST = b"GET /blob HTTP/1.1\r\nhost: proxy.test\r\n\r\n"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


class _PipeEnd(trio.abc.Stream):
    """One end of a duplex pipe that hands over each written ``bytes`` object as is."""

    def __init__(
        self, outgoing: trio.MemorySendChannel[bytes], incoming: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._out = outgoing
        self._in = incoming
        self._pending = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._out.send(bytes(data) if not isinstance(data, bytes) else data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio.BrokenResourceError("the other end closed") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._in.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                return b""
        if max_bytes is None or len(self._pending) <= max_bytes:
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out

    async def aclose(self) -> None:
        self._out.close()
        self._in.close()
        await trio.lowlevel.checkpoint()


def pipe() -> tuple[_PipeEnd, _PipeEnd]:
    """A connected (client, server) pair; each write blocks until the peer takes it."""
    to_server_send, to_server_receive = trio.open_memory_channel[bytes](0)
    to_client_send, to_client_receive = trio.open_memory_channel[bytes](0)
    return (
        _PipeEnd(to_server_send, to_client_receive),
        _PipeEnd(to_client_send, to_server_receive),
    )


@dataclass
class Digests:
    """sha256 of many bodies made of shared chunk objects: each distinct prefix hashed once.

    A body is a state number; feeding a chunk object already fed after the same prefix reuses
    that hash, so a herd served the same ``bytes`` objects costs one sha256 of the body.
    """

    _memo: dict[tuple[int, int], tuple[int, bytes]] = field(default_factory=dict)
    _states: list[hashlib._Hash] = field(default_factory=lambda: [hashlib.sha256()])

    def start(self) -> int:
        return 0

    def feed(self, state: int, chunk: bytes) -> int:
        key = (state, id(chunk))
        hit = self._memo.get(key)
        if hit is not None and hit[1] is chunk:
            return hit[0]
        hasher = self._states[state].copy()
        hasher.update(chunk)
        self._states.append(hasher)
        self._memo[key] = (len(self._states) - 1, chunk)  # chunk kept alive: its id stays unique
        return len(self._states) - 1

    def hexdigest(self, state: int) -> str:
        return self._states[state].hexdigest()


@dataclass
class Seen:
    """One herd client's view."""

    status: int = 0
    x_cache: str = ""
    size: int = 0
    digest: str = ""
    first_byte_at: float | None = None
    complete: bool = False


async def herd_client(
    h: Harness, digests: Digests, seen: Seen, *, leave_after: int | None = None
) -> None:
    """GET /blob and read the body (Content-Length framed) without copying it."""
    client, server_end = pipe()
    h.nursery.start_soon(h.server.handle_connection, server_end)
    await client.send_all(REQUEST)
    head = await client.receive_some()
    lines = head.split(b"\r\n")
    seen.status = int(lines[0].split()[1])
    fields = {
        name.lower(): value
        for name, _, value in (line.decode().partition(": ") for line in lines[1:] if line)
    }
    seen.x_cache = fields.get("x-cache", "")
    length = int(fields["content-length"])
    state = digests.start()
    while seen.size < length and (leave_after is None or seen.size < leave_after):
        chunk = await client.receive_some()
        if not chunk:
            break
        if seen.first_byte_at is None:
            seen.first_byte_at = trio.current_time()
        seen.size += len(chunk)
        state = digests.feed(state, chunk)
    seen.complete = seen.size == length
    seen.digest = digests.hexdigest(state)
    await client.aclose()


def dribbled(body: bytes) -> Reply:
    """``body`` in :data:`CHUNK` pieces, one every :data:`CHUNK_DELAY` seconds."""
    pieces = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    return Reply(
        headers=[("cache-control", "max-age=600"), ("etag", '"blob"')],
        body=pieces,
        chunk_delay=CHUNK_DELAY,
    )


async def test_herd_of_1000_makes_one_upstream_request(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * (BODY_SIZE // 256)
    expected = hashlib.sha256(body).hexdigest()
    digests = Digests()
    seen = [Seen() for _ in range(HERD)]
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/blob", dribbled(body))
        t0 = trio.current_time()
        async with trio.open_nursery() as clients:
            for s in seen:
                clients.start_soon(herd_client, h, digests, s)
        await h.settle()
    assert h.origin.count("/blob") == 1
    assert {(s.status, s.x_cache, s.size, s.complete, s.digest) for s in seen} == {
        (200, "MISS", BODY_SIZE, True, expected)
    }
    first_bytes = [s.first_byte_at - t0 for s in seen if s.first_byte_at is not None]
    assert len(first_bytes) == HERD
    assert max(first_bytes) < FILL_TIME  # every waiter streamed while the fill was running


async def test_leader_leaving_does_not_stop_the_fill_for_waiters(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * (2 * MIB // 256)
    expected = hashlib.sha256(body).hexdigest()
    digests = Digests()
    leader, waiters = Seen(), [Seen() for _ in range(20)]
    # Without waiters this route would abandon a fill whose client left.
    routes = [
        {"prefix": "/", "upstreams": "http://origin.test", "finish_fill_on_disconnect": False}
    ]
    async with open_harness(tmp_path, monkeypatch, routes) as h:
        h.origin.set("/blob", dribbled(body))
        async with trio.open_nursery() as clients:
            clients.start_soon(functools.partial(herd_client, leave_after=0), h, digests, leader)
            await h.settle()  # the leader's fill is registered
            for s in waiters:
                clients.start_soon(herd_client, h, digests, s)
        await h.settle()
        after = await h.get("/blob")
    assert (leader.status, leader.size) == (200, 0)
    assert {(s.status, s.size, s.complete, s.digest) for s in waiters} == {
        (200, len(body), True, expected)
    }
    assert (after.cache, hashlib.sha256(after.body).hexdigest()) == ("HIT", expected)
    assert h.origin.count("/blob") == 1


async def test_unstorable_response_makes_each_waiter_fetch(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set(
            "/private", Reply(headers=[("cache-control", "no-store")], body=b"mine", delay=1.0)
        )
        got: list[Got] = []

        async def one() -> None:
            got.append(await h.get("/private"))

        async with trio.open_nursery() as clients:
            for _ in range(10):
                clients.start_soon(one)
    assert [(g.status, g.body, g.complete) for g in got] == [(200, b"mine", True)] * 10
    assert h.origin.count("/private") == 10


async def test_failed_fill_gives_its_waiters_the_same_502_from_one_upstream_request(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def flaky(request: Request) -> Reply:
        calls.append(1)
        if len(calls) == 1:
            return Reply(status=503, body=b"busy", delay=1.0)
        return Reply(headers=[("cache-control", "max-age=60")], body=b"ok", delay=1.0)

    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/f", flaky)
        got: list[Got] = []

        async def one() -> None:
            got.append(await h.get("/f"))

        async with trio.open_nursery() as clients:
            clients.start_soon(one)
            await h.settle()  # the first request leads
            for _ in range(9):
                clients.start_soon(one)
        later = await h.get("/f")
    # The waiters got nothing from the fill before it failed: they share the leader's answer
    # instead of each asking the failing upstream again. Nothing of it was stored.
    assert [g.status for g in got] == [502] * 10
    assert {g.body for g in got} == {got[0].body}
    assert (later.status, later.body) == (200, b"ok")
    assert len(calls) == 2


async def test_waiter_leaving_mid_body_leaves_the_others_whole(
    clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * (4 * MIB // 256)
    expected = hashlib.sha256(body).hexdigest()
    digests = Digests()
    leader, quitter, others = Seen(), Seen(), [Seen() for _ in range(5)]
    async with open_harness(tmp_path, monkeypatch) as h:
        h.origin.set("/blob", dribbled(body))
        async with trio.open_nursery() as clients:
            clients.start_soon(herd_client, h, digests, leader)
            await h.settle()
            clients.start_soon(functools.partial(herd_client, leave_after=1), h, digests, quitter)
            for s in others:
                clients.start_soon(herd_client, h, digests, s)
        await h.settle()
        gc.collect()  # an abandoned async generator would warn here (an error in this suite)
    assert (quitter.status, quitter.complete) == (200, False)
    assert 0 < quitter.size < len(body)
    assert {(s.size, s.complete, s.digest) for s in (leader, *others)} == {
        (len(body), True, expected)
    }
    assert h.origin.count("/blob") == 1


async def test_waiters_take_duplicates_of_the_leaders_descriptor_without_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fill.part"
    path.write_bytes(b"0123456789")
    fill = Fill("k")
    threads: list[object] = []
    real = trio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kw: Any) -> Any:
        threads.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    fill.publish_head(ResponseHead(status=200), None, open(path, "rb"), True)  # noqa: SIM115
    files = [fill.open_follower() for _ in range(3)]
    fill.finish(None)
    late = fill.open_follower()
    fill.close_shared()
    try:
        assert threads == []
        # Each waiter's own descriptor stays readable after the shared one closed (pread:
        # the descriptors share one file offset).
        assert [os.pread(f.fileno(), 10, 0) for f in files if f is not None] == [b"0123456789"] * 3
        assert late is None
    finally:
        for f in files:
            if f is not None:
                f.close()


def _filling(path: Path, size: int) -> Fill:
    fill = Fill("k")
    head = ResponseHead(status=200, headers=Headers([("content-length", str(size))]))
    fill.publish_head(head, None, open(path, "rb"), True)  # noqa: SIM115
    return fill


async def test_waiters_get_the_leaders_pieces_from_memory_before_any_reach_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fill.part"
    path.write_bytes(b"")  # the writer's first batch is still in memory
    fill = _filling(path, 6)
    fill.waiters = 1
    file = fill.open_follower()
    assert file is not None

    async def no_thread(fn: Any, *args: Any, **kw: Any) -> Any:
        raise AssertionError(f"unexpected worker-thread call {fn}")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    first, second = b"abc", b"def"
    body = fill.follow(file)
    try:
        fill.publish_body(first)
        got = [await body.__anext__()]
        fill.publish_body(second)
        got.append(await body.__anext__())
        with pytest.raises(StopAsyncIteration):
            await body.__anext__()
    finally:
        file.close()
        fill.close_shared()
    assert got == [b"abc", b"def"]
    assert got[0] is first  # the leader's own bytes object, not a copy


async def test_a_waiter_behind_the_window_reads_the_file_then_catches_up_in_memory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fill.part"
    path.write_bytes(b"abcdef")  # what the writer has written so far
    fill = _filling(path, 10)
    fill.publish_body(b"abcd")
    fill.publish_written(4)  # nobody follows yet: written pieces leave memory at once
    fill.publish_body(b"efghij")
    fill.publish_written(6)  # "ghij" is not in the file: that piece must stay
    assert fill._live == [b"efghij"]
    fill.waiters = 1
    file = fill.open_follower()
    assert file is not None
    try:
        got = [chunk async for chunk in fill.follow(file)]
    finally:
        file.close()
        fill.close_shared()
    assert got == [b"abcdef", b"ghij"]
