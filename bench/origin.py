"""The bench origin: a small, fast trio + h11 server of deterministic bodies.

``GET /bytes/<n>[/<tag>][?max_age=&swr=&sie=&delay=&rate=]`` answers ``n`` bytes from
:mod:`payload` with ``Cache-Control``, a strong ``ETag`` and a fixed ``Last-Modified`` (both
stable across restarts, so a cache may revalidate against a restarted origin). Conditional
requests are honoured as RFC 9110 §13.2.2 orders them: ``If-None-Match`` first, and
``If-Modified-Since`` only without it; a match answers 304. ``delay`` holds the response head
back and ``rate`` paces the body, so a fill can be made to take about a second (the herd
scenario). ``GET /__stats`` returns JSON counters so the driver can count upstream fetches by
difference; ``/__health`` answers 200. Neither is counted.

``--down`` runs the outage stub instead: it takes over the port of a killed origin, reads each
request head, answers ``/__stats`` and resets every other connection (``SO_LINGER`` 0), counting
them, so the driver can see how hard each proxy hits an upstream that is down.

Prints ``READY port=<n>`` once listening. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import functools
import json
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import cast

import h11
import trio
from payload import OriginRequest, body_chunks, etag_for, parse_origin_target

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "LAST_MODIFIED",
    "OriginStats",
    "main",
    "response_head",
    "serve_origin",
]

HOST = "127.0.0.1"
DEFAULT_MAX_AGE_S = 3600
LAST_MODIFIED = 1_700_000_000  # fixed, so validators survive a restart
RECEIVE_BYTES = 64 * 1024
PACE_TICK_S = 0.02  # rate-limited bodies are sent in slices of this much time
IDLE_TIMEOUT_S = 120.0
DOWN_READ_TIMEOUT_S = 2.0
_LAST_MODIFIED_HTTP = email.utils.formatdate(LAST_MODIFIED, usegmt=True)


@dataclass(kw_only=True)
class OriginStats:
    """Counters served at ``/__stats`` (mutable: the one instance belongs to the server)."""

    mode: str = "up"
    connections: int = 0
    requests: int = 0
    conditional: int = 0
    not_modified: int = 0
    full: int = 0
    body_bytes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    not_found: int = 0


def _cache_control(req: OriginRequest, default_max_age: int) -> str:
    parts = [f"max-age={req.max_age if req.max_age is not None else default_max_age}"]
    if req.swr is not None:
        parts.append(f"stale-while-revalidate={req.swr}")
    if req.sie is not None:
        parts.append(f"stale-if-error={req.sie}")
    return ", ".join(parts)


def response_head(
    parsed: OriginRequest,
    date: bytes,
    default_max_age: int = DEFAULT_MAX_AGE_S,
    *,
    full: bool = True,
) -> list[tuple[bytes, bytes]]:
    """The header fields the origin answers ``parsed`` with: a 200's (``full``) or a 304's.

    Shared with :mod:`seed`, which writes into a cache what the origin would have sent.
    """
    head = [
        (b"date", date),
        (b"cache-control", _cache_control(parsed, default_max_age).encode()),
        (b"etag", etag_for(parsed.path, parsed.size).encode()),
        (b"last-modified", _LAST_MODIFIED_HTTP.encode()),
    ]
    if full:
        head += [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(parsed.size).encode()),
        ]
    return head


def _not_modified(headers: list[tuple[bytes, bytes]], etag: str) -> bool:
    """RFC 9110 §13.2.2: If-None-Match wins; If-Modified-Since is looked at only without it."""
    inm = [v for n, v in headers if n == b"if-none-match"]
    if inm:
        tags = {t.strip().removeprefix("W/") for v in inm for t in v.decode("latin-1").split(",")}
        return "*" in tags or etag in tags
    for n, v in headers:
        if n == b"if-modified-since":
            try:
                since = email.utils.parsedate_to_datetime(v.decode("latin-1")).timestamp()
            except (TypeError, ValueError):
                return False
            return since >= LAST_MODIFIED
    return False


class _Origin:
    def __init__(self, default_max_age: int) -> None:
        self.stats = OriginStats()
        self.default_max_age = default_max_age

    async def handle(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(stream, conn)
                if not isinstance(event, h11.Request):
                    return
                while not isinstance(await self._next(stream, conn), h11.EndOfMessage):
                    pass
                await self._respond(stream, conn, event)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _next(self, stream: trio.SocketStream, conn: h11.Connection) -> h11.Event | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(IDLE_TIMEOUT_S):
                    conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
                    continue
                return None
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            assert isinstance(event, h11.Event)
            return event

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, *events: h11.Event
    ) -> None:
        data = b"".join(conn.send(e) or b"" for e in events)
        await stream.send_all(data)

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, req: h11.Request
    ) -> None:
        target = req.target.decode("latin-1")
        date = email.utils.formatdate(usegmt=True).encode()
        if target.startswith("/__"):
            body = b"ok\n"
            ctype = b"text/plain"
            if target.startswith("/__stats"):
                body, ctype = json.dumps(asdict(self.stats)).encode(), b"application/json"
            head = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
            head.append((b"cache-control", b"no-store"))
            await self._send(stream, conn, h11.Response(status_code=200, headers=head))
            await self._send(stream, conn, h11.Data(data=body), h11.EndOfMessage())
            return
        parsed = parse_origin_target(target)
        self.stats.requests += 1
        if parsed is None or req.method not in (b"GET", b"HEAD"):
            self.stats.not_found += 1
            head = [(b"content-length", b"0"), (b"date", date)]
            await self._send(stream, conn, h11.Response(status_code=404, headers=head))
            await self._send(stream, conn, h11.EndOfMessage())
            return
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            await self._respond_bytes(stream, conn, req, parsed, date)
        finally:
            self.stats.in_flight -= 1

    async def _respond_bytes(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        req: h11.Request,
        parsed: OriginRequest,
        date: bytes,
    ) -> None:
        etag = etag_for(parsed.path, parsed.size)
        conditional = any(n in (b"if-none-match", b"if-modified-since") for n, _ in req.headers)
        self.stats.conditional += conditional
        if parsed.delay > 0:
            await trio.sleep(parsed.delay)
        if conditional and _not_modified(list(req.headers), etag):
            self.stats.not_modified += 1
            head = response_head(parsed, date, self.default_max_age, full=False)
            await self._send(stream, conn, h11.Response(status_code=304, headers=head))
            await self._send(stream, conn, h11.EndOfMessage())
            return
        self.stats.full += 1
        head = response_head(parsed, date, self.default_max_age)
        await self._send(stream, conn, h11.Response(status_code=200, headers=head))
        if req.method == b"GET":
            await self._send_body(stream, conn, parsed)
        await self._send(stream, conn, h11.EndOfMessage())

    async def _send_body(
        self, stream: trio.SocketStream, conn: h11.Connection, parsed: OriginRequest
    ) -> None:
        chunk = 1 << 20
        if parsed.rate:
            chunk = max(1024, int(parsed.rate * PACE_TICK_S))
        start = trio.current_time()
        sent = 0
        for piece in body_chunks(parsed.path, parsed.size, chunk):
            if parsed.rate:
                # Pace against the start, not per chunk, so scheduling jitter does not add up.
                await trio.sleep_until(start + sent / parsed.rate)
            # h11 takes any buffer; passthrough avoids copying the 1 MiB slice.
            parts = conn.send_with_data_passthrough(h11.Data(data=cast("bytes", piece)))
            for part in parts or ():
                await stream.send_all(part)
            sent += len(piece)
            self.stats.body_bytes += len(piece)


class _DownStub:
    def __init__(self) -> None:
        self.stats = OriginStats(mode="down")

    async def handle(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        buf = b""
        with trio.move_on_after(DOWN_READ_TIMEOUT_S):
            while b"\r\n" not in buf and len(buf) < 8192:
                data = await stream.receive_some(8192)
                if not data:
                    break
                buf += data
        if buf.startswith(b"GET /__stats"):
            body = json.dumps(asdict(self.stats)).encode()
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            head += b"content-length: %d\r\n\r\n" % len(body)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(head + body)
            await stream.aclose()
            return
        if buf and not buf.startswith(b"GET /__"):
            self.stats.requests += 1
        # A reset, not a FIN: the proxy sees a hard failure, as with a crashed origin.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()


async def serve_origin(
    port: int,
    *,
    down: bool = False,
    default_max_age: int = DEFAULT_MAX_AGE_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the origin (or the outage stub) on ``127.0.0.1:port``; reports the bound port."""
    server = _DownStub() if down else _Origin(default_max_age)
    listeners = await trio.open_tcp_listeners(port, host=HOST, backlog=4096)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(bound)


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--down", action="store_true", help="run the outage stub (reset all)")
    ap.add_argument("--max-age", type=int, default=DEFAULT_MAX_AGE_S)
    args = ap.parse_args()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(serve_origin, down=args.down, default_max_age=args.max_age)
            port = await nursery.start(serve, args.port)
            print(f"READY port={port} pid={os.getpid()} t={time.time():.3f}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
