"""Reading a request head without h11 when it is plain, and sharing parsed header blocks.

A plain GET/HEAD head that arrives whole in one read is parsed by :func:`_plain_head` (h11's
grammar, narrowed) and given to h11 only if the response goes through h11: for a small hit,
h11's parse and a fresh h11 state per response were a fifth of the work. Clients repeat the
same head and header block request after request, so both the parse and the
:class:`~proxychain.http.Headers` built from a block are remembered for the last ones seen.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from .http import Headers

__all__ = ["SHARED_HEADER_BLOCKS", "SHARED_HEADER_BLOCK_MAX_BYTES", "RequestHead"]

# Request header blocks shared between requests (see _request_headers): how many distinct
# blocks, and the largest shared (bigger ones are rare and would pin memory).
SHARED_HEADER_BLOCKS = 256
SHARED_HEADER_BLOCK_MAX_BYTES = 8 * 1024


class RequestHead(NamedTuple):
    """What the server takes from a request head (h11's ``Request``, or a plain head)."""

    method: bytes
    target: bytes
    fields: tuple[tuple[bytes, bytes], ...]  # names as the client spelt them


# A plain request head (see _plain_head), by h11's grammar (h11/_abnf.py) narrowed to visible
# ASCII: a request line and field lines, each without its CRLF.
_PLAIN_REQUEST_LINE = re.compile(rb"(GET|HEAD) ([\x21-\x7e]+) HTTP/1\.1")
_FIELD_LINE = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*([\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?[ \t]*"
)
# Fields that make h11 do more than parse (framing, keep-alive, 100-continue, upgrades).
_H11_FIELDS = frozenset(
    {b"connection", b"content-length", b"transfer-encoding", b"expect", b"upgrade"}
)


@functools.lru_cache(maxsize=SHARED_HEADER_BLOCKS)
def _plain_head(data: bytes) -> RequestHead | None:
    """``data`` as a plain request head, or ``None`` when h11 must parse it.

    Plain: all of ``data`` is one HTTP/1.1 GET or HEAD head with CRLF line ends, exactly
    one Host field and none of ``_H11_FIELDS``, every line as h11's grammar has it. h11
    would make the same request of it and take nothing else from it; anything else (a
    partial or pipelined head, a body, an unusual byte) goes to h11 as before.

    Remembered for the last heads seen (the caller passes only small ones): a client sends
    the same head again and again, and the answer is immutable.
    """
    if data.find(b"\r\n\r\n") != len(data) - 4:
        return None
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return None  # a bare CR or LF
    request_line, *lines = data[:-4].split(b"\r\n")
    request = _PLAIN_REQUEST_LINE.fullmatch(request_line)
    if request is None:
        return None
    fields: list[tuple[bytes, bytes]] = []
    hosts = 0
    for line in lines:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            return None
        name, value = field.groups(b"")
        lower = name.lower()
        if lower in _H11_FIELDS:
            return None
        hosts += lower == b"host"
        fields.append((name, value))
    if hosts != 1:
        return None  # h11 answers 400
    return RequestHead(request[1], request[2], tuple(fields))


@functools.lru_cache(maxsize=SHARED_HEADER_BLOCKS)
def _request_headers(raw: tuple[tuple[bytes, bytes], ...]) -> Headers:
    """One shared :class:`Headers` per distinct request header block.

    A client sends the same block on request after request, so sharing the (immutable)
    object means what is parsed from it (``Headers.memo``: the request's Cache-Control, its
    values of the fields a response varies on, whether it has a body) is parsed once, not
    per request.
    """
    return Headers.from_raw(raw)


def _has_body(headers: Headers) -> bool:
    """Whether a request head announces a body (h11 has checked its framing already)."""
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length")
    return length is not None and length.strip() != "0"
