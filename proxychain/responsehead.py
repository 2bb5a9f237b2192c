"""Serialising a response head without h11, once per head or once for many responses.

h11 would only copy the fields of a plain response and check what :func:`_direct_head`
checks, so a head framed by ``Content-Length`` is written as bytes built here, and a stored
response's head is built once (:func:`prepare`) and reused for every hit. Anything else is
left to h11 (``None`` from these functions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from http import HTTPStatus

from .http import Headers, ResponseHead

__all__ = ["PreparedHead", "prepare"]


@dataclass(frozen=True, slots=True)
class PreparedHead:
    """A response head serialised once for many responses (a stored response's head).

    ``block`` is the status line and every field, each line ending in CRLF, without the
    blank line: the fields that change per response (``Age``, ``X-Cache``) are appended to
    it by :meth:`~proxychain.sink.H11Sink.start_prepared`. ``None`` when h11 must frame the
    response.
    """

    head: ResponseHead  # without the per-response fields
    block: bytes | None
    length: int  # the body length its Content-Length announces


def prepare(status: int, reason: str, headers: Headers) -> PreparedHead:
    """Serialise a head whose per-response fields are added later (see :class:`PreparedHead`).

    ``headers`` must not contain the fields added later.
    """
    fields = ResponseHead(status=status, reason=reason, headers=headers)
    direct = _direct_head(status, reason.encode("latin-1") or _reason_phrase(status), headers.raw())
    if direct is None:
        return PreparedHead(fields, None, 0)
    head, length = direct
    return PreparedHead(fields, head[:-2], length)  # without the closing blank line


def _direct_head(
    status: int, reason: bytes, fields: list[tuple[bytes, bytes]]
) -> tuple[bytes, int] | None:
    """The serialised head and body length, or ``None`` when h11 must frame the response.

    Only ``Content-Length`` framing without ``Connection``/``Transfer-Encoding`` qualifies, and
    no field may carry CR, LF or NUL (no injected fields; h11 reports those as errors).
    """
    if status < 200 or status in (204, 304):
        return None
    length = None
    for name, value in fields:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name in (b"connection", b"transfer-encoding"):
            return None
    if length is None:
        return None
    head = b"".join(
        [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        + [b"%s: %s\r\n" % field for field in fields]
        + [b"\r\n"]
    )
    lines = len(fields) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        return None
    return head, length


def _field_lines(fields: Headers) -> bytes | None:
    """``fields`` as header lines, or ``None`` when one carries CR, LF or NUL (the checks h11
    would make: no injected fields)."""
    if any(
        "\r" in n or "\n" in n or "\0" in n or "\r" in v or "\n" in v or "\0" in v
        for n, v in fields
    ):
        return None
    return b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in fields)


@functools.cache
def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
