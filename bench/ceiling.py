"""The Python ceiling: the least a trio + h11 server can do per request.

Every GET is answered with one fixed body of ``--size`` bytes held in memory, on keep-alive
connections; nothing is looked up, nothing is copied per request. Small responses leave in one
``send_all`` (head and body joined), big ones in 1 MiB ``send_all`` slices, which is what counts
for throughput (more bytes per system call). Whatever proxychain's hit path reaches is measured
against this number: a cache cannot be faster than serving a constant.

``--processes N`` runs N processes on one port with ``SO_REUSEPORT`` (the kernel spreads new
connections over them). The first process binds, learns the port, then starts the others, which
die with it (``PR_SET_PDEATHSIG``). Prints ``READY port=<n>`` once all listen. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import h11
import trio

__all__ = ["main", "serve_ceiling"]

HOST = "127.0.0.1"
SEND_CHUNK_BYTES = 1 << 20
JOIN_BELOW_BYTES = 64 * 1024  # below this, head and body go out in one write
RECEIVE_BYTES = 64 * 1024
_PR_SET_PDEATHSIG = 1


async def _open_listener(port: int) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind((HOST, port))
    sock.listen(4096)
    return trio.SocketListener(sock)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


def _make_handler(size: int) -> Handler:
    """A connection handler answering every request with ``size`` bytes."""
    small = b"x" * size
    body = memoryview(small)
    head_fields = [(b"content-type", b"application/octet-stream"), (b"x-cache", b"HIT")]

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    continue
                if not isinstance(event, h11.EndOfMessage):
                    return
                head = conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[*head_fields, (b"content-length", b"%d" % size)],
                    )
                )
                assert head is not None
                if size < JOIN_BELOW_BYTES:
                    end = conn.send(h11.Data(data=small)) or b""
                    await stream.send_all(head + end + (conn.send(h11.EndOfMessage()) or b""))
                else:
                    await stream.send_all(head)
                    for pos in range(0, size, SEND_CHUNK_BYTES):
                        piece = body[pos : pos + SEND_CHUNK_BYTES]
                        parts = conn.send_with_data_passthrough(h11.Data(data=piece))  # type: ignore[arg-type]
                        for part in parts or ():
                            await stream.send_all(part)
                    conn.send(h11.EndOfMessage())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    return handle


async def serve_ceiling(
    port: int,
    size: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``size``-byte responses on ``127.0.0.1:port`` (SO_REUSEPORT); reports the port."""
    listener = await _open_listener(port)
    bound = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _make_handler(size), [listener])
        task_status.started(bound)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the first process exits, however it exits."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024, help="body size in bytes")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _die_with_parent()
    children: list[subprocess.Popen[bytes]] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_ceiling, args.port, args.size)
            argv = [sys.executable, __file__, "--child", f"--port={port}", f"--size={args.size}"]
            pipe = subprocess.PIPE
            children.extend(subprocess.Popen(argv, stdout=pipe) for _ in range(args.processes - 1))
            # Children bind the same port; wait until each is accepting before saying READY.
            for child in children:
                await _wait_ready(child)
            print(f"READY port={port} pid={os.getpid()}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)


async def _wait_ready(child: subprocess.Popen[bytes]) -> None:
    """Wait (bounded) for the child's READY line."""
    assert child.stdout is not None
    with trio.move_on_after(10):
        await trio.to_thread.run_sync(child.stdout.readline, abandon_on_cancel=True)


if __name__ == "__main__":
    main()
