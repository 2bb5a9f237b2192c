"""The data-plane server: trio listeners and one h11 loop per client connection.

Theory of operation:

* ``serve`` binds, reports the bound port through ``task_status.started`` and runs two
  nurseries: the accept loops, and one handler task per connection. Shutdown is a deadline
  on the handler nursery (the hypercorn pattern): when ``shutdown`` is set the listeners close,
  connections idling between requests are told to stop at once, and in-flight responses get
  ``graceful_timeout`` seconds to finish before they are cancelled.
* Each connection runs h11's ``NEED_DATA`` loop. A request head becomes a
  :class:`~proxychain.http.Request`; its body (if any) is an async iterator the proxy may
  stream upstream; the response goes out through :class:`H11Sink`. Anything that breaks the
  protocol gets h11's ``error_status_hint`` (400, 431) and the connection closes.
* A client that goes away shows up as ``trio.BrokenResourceError`` from ``send_all``; the sink
  turns it into :class:`ClientGone` so the proxy can decide whether a cache fill continues.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import h11
import trio

from .clock import Clock
from .errors import ProxyChainError
from .http import Headers, Request, ResponseHead, format_http_date
from .settings import ServerSettings

__all__ = ["ClientGone", "ClientInfo", "Exchange", "H11Sink", "Server", "serve"]

log = logging.getLogger("proxychain.server")
access_log = logging.getLogger("proxychain.access")

READ_SIZE = 64 * 1024  # bytes per receive_some; request heads are small, bodies stream
# How much of an unread request body we read and discard to keep a connection alive.
MAX_DRAIN_BYTES = 1024 * 1024
SERVER_NAME = "proxychain"


class ClientGone(Exception):
    """The client closed or reset its connection while we were sending."""


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
    extra: dict[str, str] = field(default_factory=dict)


class H11Sink:
    """Writes one response on an h11 connection; the proxy's only way to talk to a client."""

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self.status = 0
        self.bytes_sent = 0
        self.started = False
        self.ended = False
        self.aborted = False

    async def start(self, head: ResponseHead) -> None:
        """Send the status line and header fields."""
        headers = head.headers
        if self._conn.draining:
            headers = headers.set("connection", "close")
        self.started = True
        self.status = head.status
        event = h11.Response(
            status_code=head.status,
            headers=headers.raw(),
            reason=head.reason.encode("latin-1"),
        )
        await self._conn.send(event)

    async def send(self, chunk: bytes) -> None:
        """Send a piece of the body (dropped for HEAD)."""
        if self._head_only or not chunk:
            return
        await self._conn.send(h11.Data(data=chunk))
        self.bytes_sent += len(chunk)

    async def end(self) -> None:
        """Finish the response; the connection may serve another request."""
        await self._conn.send(h11.EndOfMessage())
        self.ended = True

    async def abort(self) -> None:
        """Cut the response short: the client sees a truncated transfer, never a complete one."""
        self.aborted = True
        await self._conn.close()


class _Connection:
    """One client connection: h11 state plus the stream, with protocol errors mapped."""

    def __init__(self, stream: trio.abc.Stream, settings: ServerSettings) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
        self.draining = False
        self.closed = False

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = True
                raise ClientGone(str(exc)) from None

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = bytes(await self.stream.receive_some(READ_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self.h11.receive_data(data)
                continue
            return event

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)


class Server:
    """Tracks live connections so shutdown can stop idle ones and drain busy ones."""

    def __init__(self, proxy: _Handler, settings: ServerSettings, clock: Clock) -> None:
        self.proxy = proxy
        self.settings = settings
        self.clock = clock
        self.draining = False
        self._idle_scopes: set[trio.CancelScope] = set()
        self._connections: set[_Connection] = set()

    def start_draining(self) -> None:
        """Stop idle keep-alive connections now; busy ones close after their response."""
        self.draining = True
        for conn in self._connections:
            conn.draining = True
        for scope in list(self._idle_scopes):
            scope.cancel()

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection until it closes."""
        conn = _Connection(stream, self.settings)
        conn.draining = self.draining
        self._connections.add(conn)
        client = ClientInfo(address=_peer_address(stream))
        try:
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
            timeout = self.settings.header_timeout if first else self.settings.keepalive_timeout
            first = False
            with trio.CancelScope() as idle_scope:
                idle_scope.deadline = trio.current_time() + timeout
                self._idle_scopes.add(idle_scope)
                if self.draining:
                    idle_scope.cancel()
                try:
                    event = await conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(conn, exc)
                    return
                finally:
                    self._idle_scopes.discard(idle_scope)
            if idle_scope.cancelled_caught:
                return  # idle timeout, or shutting down between requests
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            if _head_size(event) > self.settings.max_header_bytes:
                # h11 only bounds heads that arrive incomplete; one read can bring a whole one.
                await self._protocol_error(
                    conn, h11.RemoteProtocolError("request head too large", 431)
                )
                return
            await self._serve_one(conn, client, event)
            if not await self._next_cycle(conn):
                return

    async def _serve_one(self, conn: _Connection, client: ClientInfo, event: h11.Request) -> None:
        started = self.clock.monotonic()
        request = Request(
            method=event.method.decode("ascii"),
            target=event.target.decode("latin-1"),
            headers=Headers.from_raw(event.headers),
            scheme=client.scheme,
        )
        sink = H11Sink(conn, request)
        exchange = Exchange()
        body = _request_body(conn) if _has_body(event) else None
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
        h = conn.h11
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
        if conn.h11.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
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
        self._log_line("-", "-", "-", status, len(body), 0.0, "ERROR", "-", "-", "-", str(exc))

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
        self._log_line(
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
        hook = getattr(self.proxy, "request_done", None)
        if hook is not None:
            hook(request, sink.status, sink.bytes_sent, duration, exchange, sink.aborted)

    def _log_line(
        self,
        addr: str,
        method: str,
        target: str,
        status: int,
        nbytes: int,
        duration: float,
        outcome: str,
        tier: str,
        upstream: str,
        route: str,
        detail: str,
    ) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(
            '%s "%s %s" %d %d %.3fs cache=%s tier=%s upstream=%s%s',
            addr or "-",
            method,
            target,
            status,
            nbytes,
            duration,
            outcome,
            tier,
            upstream,
            f" ({detail})" if detail else "",
            extra={
                "client": addr,
                "method": method,
                "path": target,
                "status": status,
                "bytes": nbytes,
                "duration": round(duration, 6),
                "cache": outcome,
                "tier": tier,
                "upstream": upstream,
                "route": route,
                "detail": detail,
            },
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


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)


def _has_body(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


async def _request_body(conn: _Connection) -> AsyncIterator[bytes]:
    """Stream the request body; sends ``100 Continue`` first if the client waits for it."""
    h = conn.h11
    if h.they_are_waiting_for_100_continue:
        await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ClientGone("request body cut short")


def _peer_address(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return ""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def error_head(status: int, reason: str, clock: Clock) -> ResponseHead:
    """The head of a proxychain-generated error response."""
    body_len = len(reason.encode()) + 1
    headers = Headers(
        [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(body_len)),
            ("cache-control", "no-store"),
            ("date", format_http_date(clock.wall())),
            ("x-proxychain-error", reason[:200].encode("ascii", "replace").decode("ascii")),
        ]
    )
    return ResponseHead(status=status, headers=headers)


async def send_error(sink: H11Sink, status: int, reason: str, clock: Clock) -> None:
    """Answer with a short text error (``reason`` plus a newline)."""
    await sink.start(error_head(status, reason, clock))
    await sink.send((reason + "\n").encode())
    await sink.end()


async def serve(
    proxy: _Handler,
    settings: ServerSettings,
    *,
    clock: Clock,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    listeners: list[trio.SocketListener] | None = None,
) -> None:
    """Run the data plane until ``shutdown`` is set, then drain.

    Args:
        proxy: the request handler (a :class:`~proxychain.proxy.Proxy`).
        settings: listener address and connection timeouts.
        clock: the proxy's clock.
        shutdown: set it to stop accepting and start the graceful drain.
        task_status: receives the bound port once listening.
        listeners: already-bound listeners (multi-process workers share one socket).
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    port = listeners[0].socket.getsockname()[1]
    server = Server(proxy, settings, clock)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(_accept_loop, listener, handlers, server)
            task_status.started(port)
            await shutdown.wait()
            acceptors.cancel_scope.cancel()
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()
        server.start_draining()
        grace = settings.graceful_timeout
        handlers.cancel_scope.deadline = (
            trio.current_time() + grace if math.isfinite(grace) else math.inf
        )


async def _accept_loop(
    listener: trio.SocketListener, handlers: trio.Nursery, server: Server
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            # EMFILE and friends: back off briefly instead of spinning (trio's serve_listeners).
            log.error("accept failed: %s", exc)
            await trio.sleep(0.1)
            continue
        handlers.start_soon(server.handle_connection, stream)
