"""Writing one response to a client: :class:`H11Sink`, and the short error responses.

The head of a small plain response waits for its body, so both go out in one system call;
such heads are serialised without h11 (:mod:`proxychain.responsehead`), and a body from a
file goes out by ``os.sendfile`` (no copy through Python). Anything else is framed by h11 on
the connection's state.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import h11
import trio

from .clock import Clock
from .connection import ClientGone, _Connection
from .http import Headers, Request, ResponseHead, format_http_date
from .responsehead import PreparedHead, _direct_head, _field_lines, _reason_phrase

__all__ = ["COALESCE_MAX_BYTES", "H11Sink", "error_head", "send_error"]

# A head and a body chunk up to this size go out in one write (loopback: one syscall ~ 10 us).
COALESCE_MAX_BYTES = 64 * 1024


class H11Sink:
    """Writes one response on an h11 connection; the proxy's only way to talk to a client.

    The head of a small plain response (HTTP/1.1 request without a body or ``Connection``
    field, answered with at most ``COALESCE_MAX_BYTES`` framed by ``Content-Length``) waits
    for the body: one system call instead of two. Such heads are written without h11, which
    would only copy the fields and check what :func:`_direct_head` checks; h11 restarts on
    the bytes after the request. Any other head goes out at once, through h11.
    """

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self._plain_request = "connection" not in request.headers
        self._pending = b""  # serialised head not yet written
        self._direct_left: int | None = None  # body bytes still owed when writing directly
        self.status = 0
        self.bytes_sent = 0
        self.started = False
        self.ended = False
        self.aborted = False

    async def start_prepared(self, prepared: PreparedHead, extra: Headers) -> None:
        """Like :meth:`start` for ``prepared`` followed by the ``extra`` fields, but written
        from the pre-serialised block when the response may skip h11 (see :func:`prepare`)."""
        conn = self._conn
        block = prepared.block
        # The extra fields are often the same object response after response (see
        # delivery.py), so their serialised form is remembered with them.
        extra_lines = extra.memo(_field_lines, _field_lines)
        if (
            block is None
            or extra_lines is None
            or conn.draining
            or not self._plain_request
            or not conn.plain_exchange()
        ):
            head = prepared.head
            await self.start(
                ResponseHead(
                    status=head.status, reason=head.reason, headers=head.headers.update(extra)
                )
            )
            return
        lines = [block, extra_lines]
        if conn.worker_field is not None:
            lines.append(b"%s: %s\r\n" % conn.worker_field)
        lines.append(b"\r\n")
        self.started = True
        self.status = prepared.head.status
        self._pending = b"".join(lines)
        self._direct_left = 0 if self._head_only else prepared.length
        if self._direct_left > COALESCE_MAX_BYTES:
            pending, self._pending = self._pending, b""
            await conn.write(pending)

    async def start(self, head: ResponseHead) -> None:
        """Send the status line and header fields (held for a small body)."""
        conn = self._conn
        fields = head.headers.raw()
        if conn.draining:
            fields = [(n, v) for n, v in fields if n != b"connection"]
            fields.append((b"connection", b"close"))
        if conn.worker_field is not None:
            fields.append(conn.worker_field)
        reason = head.reason.encode("latin-1") or _reason_phrase(head.status)
        self.started = True
        self.status = head.status
        direct = None
        if self._plain_request and not conn.draining and conn.plain_exchange():
            direct = _direct_head(head.status, reason, fields)
        if direct is not None:
            self._pending, length = direct
            self._direct_left = 0 if self._head_only else length
            if self._direct_left <= COALESCE_MAX_BYTES:
                return
        else:
            event = h11.Response(status_code=head.status, headers=fields, reason=reason)
            self._pending = conn.h11_state.send(event) or b""
        # A long or streamed body: the client sees the status now, not after the first read.
        pending, self._pending = self._pending, b""
        await conn.write(pending)

    async def send(self, chunk: bytes) -> None:
        """Send a piece of the body (dropped for HEAD)."""
        if self._head_only or not chunk:
            return
        if self._direct_left is None:
            data = self._conn.h11_state.send(h11.Data(data=chunk)) or b""
        elif len(chunk) > self._direct_left:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        else:
            self._direct_left -= len(chunk)
            data = chunk
        if self._pending:
            pending, self._pending = self._pending, b""
            if len(data) <= COALESCE_MAX_BYTES:
                data = pending + data
            else:  # copying a big chunk costs more than one more system call
                await self._conn.write(pending)
        await self._conn.write(data)
        self.bytes_sent += len(chunk)

    async def send_file(self, file: BinaryIO, count: int) -> bool:
        """Send ``count`` bytes of ``file`` from its start with ``os.sendfile`` (no copy
        through Python); False, with nothing sent, when this response cannot (not framed
        directly, HEAD, or not a socket), and the caller sends the body itself.

        Raises:
            ClientGone: the client went away.
            EOFError: the file ended before ``count`` bytes (the response is cut short).
        """
        sock = getattr(self._conn.stream, "socket", None)
        if self._head_only or self._direct_left is None or count > self._direct_left:
            return False
        if not isinstance(sock, trio.socket.SocketType):
            return False
        pending, self._pending = self._pending, b""
        await self._conn.write(pending)
        offset = 0
        while offset < count:
            try:
                # In a worker thread: an entry not in the page cache is read from disk.
                sent = await trio.to_thread.run_sync(
                    _sendfile_some, sock.fileno(), file.fileno(), offset, count - offset
                )
            except OSError as exc:
                self._conn.closed = True
                raise ClientGone(str(exc)) from None
            if sent is None:
                await trio.lowlevel.wait_writable(sock)
                continue
            if sent == 0:
                raise EOFError(f"file ended after {offset} of {count} bytes")
            offset += sent
            self._direct_left -= sent
            self.bytes_sent += sent
        return True

    async def end(self) -> None:
        """Finish the response; the connection may serve another request."""
        if self._direct_left is None:
            data = self._conn.h11_state.send(h11.EndOfMessage()) or b""
        elif self._direct_left:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        else:
            data = b""
        pending, self._pending = self._pending, b""
        await self._conn.write(pending + data)
        if self._direct_left is not None:
            self._conn.restart_h11()
        self.ended = True

    async def abort(self) -> None:
        """Cut the response short: the client sees a truncated transfer, never a complete one."""
        self.aborted = True
        self._pending = b""
        await self._conn.close()


def _sendfile_some(out_fd: int, in_fd: int, offset: int, count: int) -> int | None:
    """``os.sendfile`` until ``count`` bytes went or the socket is full: bytes sent, 0 at
    the end of the file, ``None`` when the socket took nothing."""
    sent_total = 0
    while sent_total < count:
        try:
            sent = os.sendfile(out_fd, in_fd, offset + sent_total, count - sent_total)
        except BlockingIOError:
            break
        if sent == 0:
            return sent_total
        sent_total += sent
    return sent_total or None


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
