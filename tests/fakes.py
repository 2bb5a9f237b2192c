"""A scriptable fake upstream: an h11 server task, on loopback TCP or on memory streams.

Each path answers with a :class:`Reply` (or a function of the request returning one). Replies can
delay the head or the chunks, cut the body short, or never answer; the origin records every
request it received so tests can assert what reached it (``If-None-Match`` sent, exactly one
fetch for a herd, no request while a breaker is open).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import trio
import trio.testing

from proxychain.http import Headers, Request
from proxychain.upstream import Origin

__all__ = ["FakeOrigin", "Reply", "serve_origin"]


@dataclass
class Reply:
    """How the fake answers one request."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes | Sequence[bytes] = b""
    delay: float = 0.0  # before the head
    chunk_delay: float = 0.0  # before each body chunk
    cut_after: int | None = None  # send this many body bytes, then drop the connection
    never: bool = False  # accept the request and never answer
    content_length: bool = True  # False: chunked transfer coding

    @property
    def chunks(self) -> list[bytes]:
        return [self.body] if isinstance(self.body, bytes) else list(self.body)


def ok(body: bytes, *headers: tuple[str, str], status: int = 200) -> Reply:
    """A 200 with an ETag derived from the body."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    return Reply(status=status, headers=[("etag", etag), *headers], body=body)


@dataclass
class FakeOrigin:
    """An upstream that answers from a table of paths."""

    replies: dict[str, Reply | Callable[[Request], Reply]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    refuse: bool = False  # memory connector: refuse new connections
    default: Reply = field(default_factory=lambda: Reply(status=404, body=b"not found\n"))

    def set(self, path: str, reply: Reply | Callable[[Request], Reply]) -> None:
        self.replies[path] = reply

    def count(self, path: str | None = None, method: str | None = None) -> int:
        """Requests received (for ``path`` and ``method`` when given)."""
        return sum(
            1
            for r in self.requests
            if (path is None or r.target == path) and (method is None or r.method == method)
        )

    def _reply_for(self, request: Request) -> Reply:
        reply = self.replies.get(request.target) or self.replies.get(request.path) or self.default
        return reply(request) if callable(reply) else reply

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (keep-alive) until the peer closes or a reply cuts it."""
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                request = Request(
                    method=event.method.decode(),
                    target=event.target.decode(),
                    headers=Headers.from_raw(event.headers),
                )
                body = b""
                while True:
                    ev = await _next_event(conn, stream)
                    if isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                self.requests.append(request)
                self.last_body = body
                reply = self._reply_for(request)
                if not await self._answer(conn, stream, request, reply):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: Request, reply: Reply
    ) -> bool:
        if reply.never:
            await trio.sleep_forever()
        if reply.delay:
            await trio.sleep(reply.delay)
        chunks = reply.chunks
        total = sum(len(c) for c in chunks)
        headers = list(reply.headers)
        if (
            reply.content_length
            and reply.status not in (204, 304)
            and not any(n.lower() == "content-length" for n, _ in headers)
        ):
            headers.append(("content-length", str(total)))
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        if request.method == "HEAD" or reply.status in (204, 304):
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return True
        sent = 0
        for chunk in chunks:
            if reply.chunk_delay:
                await trio.sleep(reply.chunk_delay)
            if reply.cut_after is not None and sent + len(chunk) > reply.cut_after:
                piece = chunk[: reply.cut_after - sent]
                if piece:
                    await stream.send_all(conn.send(h11.Data(data=piece)))
                return False  # drop the connection mid-body
            await stream.send_all(conn.send(h11.Data(data=chunk)))
            sent += len(chunk)
        if reply.cut_after is not None and sent >= reply.cut_after:
            return False
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True

    async def connect(self, origin: Origin) -> trio.abc.Stream:
        """A :data:`proxychain.upstream.Connector` over memory streams (for MockClock tests)."""
        if self.refuse:
            raise OSError(111, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self.handle, server)
        return client

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the memory connector a nursery to run server tasks in."""
        self._nursery = nursery


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        assert not isinstance(event, type)
        return event


@asynccontextmanager
async def serve_origin(origin: FakeOrigin) -> AsyncIterator[str]:
    """Run ``origin`` on 127.0.0.1 (port 0); yield its base URL."""
    async with trio.open_nursery() as nursery:
        origin.attach(nursery)
        listeners = await nursery.start(trio.serve_tcp, origin.handle, 0)
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


_ids = itertools.count()
