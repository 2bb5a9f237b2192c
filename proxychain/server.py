"""The data-plane server: one h11 loop per client connection.

Theory of operation:

* Each connection (:class:`~proxychain.connection._Connection`) runs h11's ``NEED_DATA``
  loop. A request head becomes a :class:`~proxychain.http.Request`; its body (if any) is an
  async iterator the proxy may stream upstream; the response goes out through
  :class:`~proxychain.sink.H11Sink`. Anything that breaks the protocol gets h11's
  ``error_status_hint`` (400, 431) and the connection closes.
* A plain GET/HEAD head that arrives whole in one read skips h11 unless the response needs
  it (:mod:`proxychain.requesthead`).
* Header and keep-alive timeouts: a connection waiting for a request head notes until when it
  may wait, and one task (:meth:`Server.close_idle`) closes those past it, a few times per
  timeout. No deadline is armed per request: for a small hit that would cost about as much
  as the rest of the server's work.
* Listening, accepting and the shutdown drain are :mod:`proxychain.listen`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import h11
import trio

from .accesslog import log_access_line
from .balance import Seat
from .clock import Clock
from .connection import ClientGone, _Connection, _request_body
from .errors import ProxyChainError
from .http import Headers, Request
from .requesthead import SHARED_HEADER_BLOCK_MAX_BYTES, RequestHead, _has_body, _request_headers
from .settings import ServerSettings
from .sink import H11Sink, error_head, send_error

__all__ = [
    "IDLE_CHECK_MAX_INTERVAL",
    "IDLE_CHECK_MIN_INTERVAL",
    "MAX_DRAIN_BYTES",
    "SERVER_NAME",
    "WORKER_FIELD",
    "ClientInfo",
    "Exchange",
    "Server",
]

log = logging.getLogger("proxychain.server")

# How much of an unread request body we read and discard to keep a connection alive.
MAX_DRAIN_BYTES = 1024 * 1024
SERVER_NAME = "proxychain"
WORKER_FIELD = b"x-proxychain-worker"  # names the answering process under --workers N
# Idle connections are closed within this much after their timeout (see Server.close_idle).
IDLE_CHECK_MAX_INTERVAL = 1.0
IDLE_CHECK_MIN_INTERVAL = 0.05


@dataclass(slots=True)
class ClientInfo:
    """Where a request came from."""

    address: str = ""
    scheme: str = "http"


@dataclass(slots=True)
class Exchange:
    """What happened to one request: filled in by the proxy, logged by the server."""

    route: str = "-"
    outcome: str = "-"  # HIT, MISS, STALE, REVALIDATED, BYPASS, ERROR
    tier: str = "-"  # memory, disk
    upstream: str = "-"
    detail: str = ""


class Server:
    """Tracks live connections so shutdown can stop idle ones and drain busy ones, and
    enforces the idle timeouts (:meth:`close_idle`, run by ``serve``)."""

    def __init__(
        self,
        proxy: _Handler,
        settings: ServerSettings,
        clock: Clock,
        worker_id: str | None = None,
        seat: Seat | None = None,
    ) -> None:
        self.proxy = proxy
        self.settings = settings
        self.clock = clock
        # Told of every finished request (the proxy's figures), when the handler has it.
        self._request_done: Callable[..., None] | None = getattr(proxy, "request_done", None)
        self.worker_field = None if worker_id is None else (WORKER_FIELD, worker_id.encode("ascii"))
        self.draining = False
        self._connections: set[_Connection] = set()
        # Connections accepted and not yet closed, published on ``seat`` (workers sharing
        # one socket balance their accepts by it; see proxychain.balance).
        self.seat = seat
        self.open_connections = 0
        if seat is not None:
            seat.report(0)

    def start_draining(self) -> None:
        """Stop idle keep-alive connections now; busy ones close after their response."""
        self.draining = True
        for conn in self._connections:
            conn.draining = True
            if conn.idle:
                conn.stop_idle()

    async def close_idle(self) -> None:
        """Close every connection that waited for a request head longer than its timeout
        (header timeout for a first request, keep-alive timeout after), checking a few
        times per timeout; runs until cancelled."""
        interval = min(self.settings.header_timeout, self.settings.keepalive_timeout)
        interval = min(IDLE_CHECK_MAX_INTERVAL, max(IDLE_CHECK_MIN_INTERVAL, interval / 4))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for conn in self._connections:
                if conn.idle and now >= conn.idle_until:
                    conn.stop_idle()

    def admit(self) -> None:
        """Count a connection just accepted; :meth:`handle_admitted` serves it."""
        self._count_open(1)

    async def handle_admitted(self, stream: trio.abc.Stream) -> None:
        """Serve a connection counted by :meth:`admit`, and count it closed after."""
        try:
            await self.handle_connection(stream)
        finally:
            self._count_open(-1)

    def _count_open(self, change: int) -> None:
        self.open_connections += change
        if self.seat is not None:
            self.seat.report(self.open_connections)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection until it closes."""
        conn = _Connection(stream, self.settings, self.worker_field)
        conn.draining = self.draining
        self._connections.add(conn)
        client = ClientInfo(address=_peer_address(stream))
        try:
            with conn.idle_scope:
                await self._serve_requests(conn, client)
        except ClientGone:
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._connections.discard(conn)
            await conn.close()

    async def _serve_requests(self, conn: _Connection, client: ClientInfo) -> None:
        first = True
        while not conn.closed:
            if self.draining:
                return  # shutting down between requests
            timeout = self.settings.header_timeout if first else self.settings.keepalive_timeout
            first = False
            conn.idle_until = trio.current_time() + timeout
            conn.idle = True
            try:
                event = await conn.next_request()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(conn, exc)
                return
            finally:
                conn.idle = False
            if conn.stopped:
                return  # the timeout or the drain came as the head did: close, as just before
            if not isinstance(event, RequestHead):
                return  # the connection closed, or h11 paused on something else
            raw = event.fields
            block_size = sum(map(len, itertools.chain.from_iterable(raw))) + 4 * len(raw)
            if len(event.target) + block_size > self.settings.max_header_bytes:
                # h11 only bounds heads that arrive incomplete; one read can bring a whole one.
                await self._protocol_error(
                    conn, h11.RemoteProtocolError("request head too large", 431)
                )
                return
            if block_size <= SHARED_HEADER_BLOCK_MAX_BYTES:
                headers = _request_headers(raw)
            else:
                headers = Headers.from_raw(raw)
            await self._serve_one(conn, client, event, headers)
            if not await self._next_cycle(conn):
                return

    async def _serve_one(
        self, conn: _Connection, client: ClientInfo, event: RequestHead, headers: Headers
    ) -> None:
        started = self.clock.monotonic()
        request = Request(
            method=event.method.decode("ascii"),
            target=event.target.decode("latin-1"),
            headers=headers,
            scheme=client.scheme,
        )
        sink = H11Sink(conn, request)
        exchange = Exchange()
        body = None
        if headers.memo(_has_body, _has_body):
            body = _request_body(conn)
        else:
            conn.unread_empty_body = True
        try:
            await self.proxy.handle(request, body, sink, client, exchange)
        except ClientGone:
            exchange.detail = exchange.detail or "client gone"
            conn.closed = True
        except ProxyChainError as exc:
            # Errors the proxy did not answer itself (it normally does); map by status hint.
            if not sink.started:
                await send_error(sink, exc.status_hint, exc.reason, self.clock)
            else:
                await sink.abort()
            exchange.outcome = "ERROR"
            exchange.detail = exc.reason
        except Exception:
            log.exception("request handler failed: %s %s", request.method, request.target)
            exchange.outcome = "ERROR"
            if not sink.started and not conn.closed:
                await send_error(sink, 500, "internal error", self.clock)
            else:
                await sink.abort()
        finally:
            self._log_access(request, client, sink, exchange, started)

    async def _next_cycle(self, conn: _Connection) -> bool:
        """Prepare for the next request; False when the connection must close."""
        if conn.closed or self.draining:
            return False
        if conn.restarted:
            conn.restarted = False
            return True
        conn.read_empty_body()
        h = conn.h11_state
        if h.our_state is not h11.DONE:
            return False
        drained = 0
        while h.their_state is not h11.DONE and drained <= MAX_DRAIN_BYTES:
            if h.their_state is h11.MUST_CLOSE:
                return False
            with trio.move_on_after(self.settings.header_timeout):
                event = await conn.next_event()
            if not isinstance(event, h11.Data | h11.EndOfMessage):
                return False
            if isinstance(event, h11.Data):
                drained += len(event.data)
        if h.their_state is not h11.DONE:
            return False
        try:
            h.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    async def _protocol_error(self, conn: _Connection, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        log.info("bad request from client: %s (%d)", exc, status)
        if conn.h11_state.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
            return
        reason = "request header fields too large" if status == 431 else f"bad request: {exc}"
        # h11 refuses to send on a connection whose peer broke the protocol, so write the
        # error response with a fresh h11 state that knows nothing of the bad request.
        fresh = h11.Connection(h11.SERVER)
        fresh.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        fresh.next_event()
        head = error_head(status, reason, self.clock).headers.set("connection", "close")
        body = (reason + "\n").encode()
        data = fresh.send(h11.Response(status_code=status, headers=head.raw()))
        data = (data or b"") + (fresh.send(h11.Data(data=body)) or b"")
        data += fresh.send(h11.EndOfMessage()) or b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.stream.send_all(data)
        log_access_line("-", "-", "-", status, len(body), 0.0, "ERROR", "-", "-", "-", str(exc))

    def _log_access(
        self,
        request: Request,
        client: ClientInfo,
        sink: H11Sink,
        exchange: Exchange,
        started: float,
    ) -> None:
        duration = self.clock.monotonic() - started
        status = sink.status if not sink.aborted else -sink.status or 0
        log_access_line(
            client.address,
            request.method,
            request.target,
            status,
            sink.bytes_sent,
            duration,
            exchange.outcome,
            exchange.tier,
            exchange.upstream,
            exchange.route,
            exchange.detail,
        )
        if self._request_done is not None:
            self._request_done(
                request, sink.status, sink.bytes_sent, duration, exchange, sink.aborted
            )


class _Handler(Protocol):
    """What the server needs from the proxy (see ``proxy.Proxy.handle``)."""

    async def handle(
        self,
        request: Request,
        body: AsyncIterator[bytes] | None,
        sink: H11Sink,
        client: ClientInfo,
        exchange: Exchange,
    ) -> None: ...


def _peer_address(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return ""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
