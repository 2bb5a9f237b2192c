"""The listeners: accepting connections in bursts, and the shutdown that drains them.

``serve`` binds, reports the bound port through ``task_status.started`` and runs two
nurseries: the accept loops, and one handler task per connection (each served by
:class:`~proxychain.server.Server`). Shutdown is a deadline on the handler nursery (the
hypercorn pattern): when ``shutdown`` is set the listeners close, connections idling between
requests are told to stop at once, and in-flight responses get ``graceful_timeout`` seconds
to finish before they are cancelled.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable

import trio

from .balance import DEFER_S, Seat
from .clock import Clock
from .server import Server, _Handler
from .settings import ServerSettings

__all__ = ["ACCEPT_BURST", "serve"]

# Accept failures are the data plane's: one logger name covers everything the server reports.
log = logging.getLogger("proxychain.server")

ACCEPT_BURST = 8  # connections accepted per wake-up of an accept loop (see _accept_loop)


async def serve(
    proxy: _Handler,
    settings: ServerSettings,
    *,
    clock: Clock,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    listeners: list[trio.SocketListener] | None = None,
    worker_id: str | None = None,
    seat: Seat | None = None,
    on_listening: Callable[[bool], None] | None = None,
) -> None:
    """Run the data plane until ``shutdown`` is set, then drain.

    Args:
        proxy: the request handler (a :class:`~proxychain.proxy.Proxy`).
        settings: listener address and connection timeouts.
        clock: the proxy's clock.
        shutdown: set it to stop accepting and start the graceful drain.
        task_status: receives the bound port once listening.
        listeners: already-bound listeners (multi-process workers share one socket).
        worker_id: when set, every response names it in ``x-proxychain-worker``.
        seat: this worker's place on the board of workers sharing ``listeners``
            (:mod:`proxychain.balance`).
        on_listening: told ``True`` once accepting and ``False`` when the drain starts
            (readiness).
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    port = listeners[0].socket.getsockname()[1]
    server = Server(proxy, settings, clock, worker_id, seat)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(_accept_loop, listener, handlers, server)
            acceptors.start_soon(server.close_idle)
            if on_listening is not None:
                on_listening(True)
            task_status.started(port)
            await shutdown.wait()
            if on_listening is not None:
                on_listening(False)
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
    """Accept up to :data:`ACCEPT_BURST` waiting connections per wake-up.

    ``SocketListener.accept`` passes through the scheduler after each connection: while a
    herd's waiters are being fed (hundreds of tasks per pass), newcomers were let in one per
    pass, and the last of 500 waited seconds for its first byte (slowest 0.6 to 1.9 s,
    against 0.15 to 0.2 s with bursts of 8, on 2 cores; the median did not move). A burst
    is bounded so that one wake-up does not start every newcomer at once.

    A worker sharing the socket (``server.seat``) that has more open connections than a
    sibling leaves the next one to that sibling for a moment, and ends a burst once ahead.
    """
    seat = server.seat
    # A second handle on the listening socket, for plain non-blocking accepts; closing it
    # leaves the listener open.
    with socket.socket(fileno=os.dup(listener.socket.fileno())) as raw:
        raw.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(raw)
            if seat is not None and seat.ahead():
                await trio.sleep(DEFER_S)  # the sibling was woken too; then take it anyway
            for taken in range(ACCEPT_BURST):
                if taken and seat is not None and seat.ahead():
                    break
                try:
                    conn, _ = raw.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    # EMFILE and friends: back off briefly instead of spinning (as trio's
                    # serve_listeners does).
                    log.error("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    break
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                server.admit()
                handlers.start_soon(server.handle_admitted, stream)
