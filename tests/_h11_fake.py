"""A scriptable in-process HTTP/1.1 server on h11, for upstream-client and proxy tests.

:class:`FakeUpstream` is a :data:`proxychain.upstream.Connector`: each call makes a
``trio.testing.memory_stream_pair()``, serves one end in a task of the nursery it was given and
returns the other. A *script* maps each received request to a :class:`Reply`, which can delay,
stall, truncate, send raw bytes or drop the connection. Every request is recorded, body
included, so tests can assert what reached the upstream. :func:`serve_h11` runs the same loop
on any stream (a TLS server in the loopback tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h11
import trio
import trio.testing

from proxychain.upstream import Origin

__all__ = ["FakeUpstream", "Received", "Reply", "Script", "serve_h11"]


@dataclass(frozen=True, kw_only=True)
class Received:
    """One request as the fake server saw it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # 1-based index of the connection it arrived on

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None


@dataclass(frozen=True, kw_only=True)
class Reply:
    """What the fake server does with one request.

    ``delay`` is slept before the head (``math.inf``: never answer), ``chunk_delay`` between
    body chunks. ``truncate`` closes after the chunks without ending the message; ``drop``
    closes without answering at all; ``close_after`` closes after a complete response without
    announcing it (a server-side idle timeout); ``raw`` is sent verbatim instead of a response,
    then the connection closes.
    """

    status: int = 200
    reason: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: Sequence[bytes] = ()
    informational: Sequence[int] = ()
    delay: float = 0.0
    chunk_delay: float = 0.0
    truncate: bool = False
    drop: bool = False
    close_after: bool = False
    raw: bytes | None = None


Script = Callable[[Received], Reply]


@dataclass(kw_only=True)
class FakeUpstream:
    """A connector serving ``script`` over in-memory streams.

    ``refuse`` makes connecting fail with ``ConnectionRefusedError``; ``connect_delay`` is
    slept before connecting (``math.inf``: hang).
    """

    nursery: trio.Nursery
    script: Script = field(default=lambda _: Reply())
    refuse: bool = False
    connect_delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections whose client side closed (seen as EOF by the server)
    origins: list[Origin] = field(default_factory=list)

    async def __call__(self, origin: Origin) -> trio.abc.Stream:
        self.origins.append(origin)
        if self.connect_delay:
            await trio.sleep(self.connect_delay)
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self.connections += 1
        self.nursery.start_soon(self._serve, server, self.connections)
        return client

    async def _serve(self, stream: trio.abc.Stream, index: int) -> None:
        eof = await serve_h11(stream, self.script, self.received, index)
        self.closed += eof


async def serve_h11(
    stream: trio.abc.Stream, script: Script, received: list[Received], index: int = 1
) -> bool:
    """Serve requests on ``stream`` until either side closes; True if the client closed."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request = await _next(stream, conn)
            if not isinstance(request, h11.Request):
                return isinstance(request, h11.ConnectionClosed)
            body = bytearray()
            while isinstance(event := await _next(stream, conn), h11.Data):
                body += event.data
            if not isinstance(event, h11.EndOfMessage):
                return True
            record = Received(
                method=request.method.decode(),
                target=request.target.decode(),
                headers=[(n.decode(), v.decode()) for n, v in request.headers],
                body=bytes(body),
                connection=index,
            )
            received.append(record)
            if not await _answer(stream, conn, script(record)):
                return False
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return True
    finally:
        await trio.aclose_forcefully(stream)


async def _answer(stream: trio.abc.Stream, conn: h11.Connection, reply: Reply) -> bool:
    """Carry out ``reply``; False when the connection must close afterwards."""
    if reply.delay:
        await trio.sleep(reply.delay)
    if reply.drop:
        return False
    if reply.raw is not None:
        await stream.send_all(reply.raw)
        return False
    for status in reply.informational:
        await stream.send_all(
            conn.send(h11.InformationalResponse(status_code=status, headers=[])) or b""
        )
    head = h11.Response(
        status_code=reply.status, headers=list(reply.headers), reason=reply.reason.encode()
    )
    await stream.send_all(conn.send(head) or b"")
    for i, chunk in enumerate(reply.body):
        if i and reply.chunk_delay:
            await trio.sleep(reply.chunk_delay)
        await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
    if reply.truncate:
        return False
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    return conn.our_state is h11.DONE and not reply.close_after


async def _next(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Event:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Event):
            return event
        assert event is h11.NEED_DATA  # one request at a time: never PAUSED
        conn.receive_data(bytes(await stream.receive_some(65536)))
