"""One exception tree for proxychain.

Foreign errors (``OSError``, ``trio.TooSlowError``, ``h11.RemoteProtocolError``,
``ssl.SSLError``) are translated once, at the edge where they happen (``upstream.py``,
``disk.py``), into these. Each carries a ``status_hint``: the HTTP status the server answers
with when the error reaches a client, in the manner of ``h11.ProtocolError.error_status_hint``.
"""

from __future__ import annotations

import enum

__all__ = [
    "AllUpstreamsFailed",
    "CacheCorrupt",
    "ConfigError",
    "ErrorKind",
    "ProxyChainError",
    "RequestRefused",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class ErrorKind(enum.Enum):
    """What went wrong talking to an upstream; the failover rule and the breaker key on it."""

    CONNECT = "connect"  # DNS, refused, unreachable: nothing was sent
    TLS = "tls"  # handshake or certificate verification failed
    RESET = "reset"  # the connection broke before any response byte arrived
    TIMEOUT = "timeout"  # connect, first-byte or between-bytes timeout
    PROTOCOL = "protocol"  # malformed response, or the body was cut short


class ProxyChainError(Exception):
    """Base of every error proxychain raises on purpose."""

    status_hint: int = 500

    def __init__(self, message: str, *, status_hint: int | None = None) -> None:
        super().__init__(message)
        if status_hint is not None:
            self.status_hint = status_hint

    @property
    def reason(self) -> str:
        """The one-line reason shown to clients and logs."""
        return str(self)


class ConfigError(ProxyChainError):
    """A configuration file or value is wrong; the message names file, key and expectation."""

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.key = key


class RequestRefused(ProxyChainError):
    """The request is refused before any upstream is contacted (403, 404, 508, ...)."""

    status_hint = 403


class UpstreamError(ProxyChainError):
    """An upstream could not give a usable answer."""

    status_hint = 502
    kind: ErrorKind = ErrorKind.PROTOCOL

    def __init__(
        self,
        message: str,
        *,
        upstream: str = "",
        status_hint: int | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        super().__init__(message, status_hint=status_hint)
        self.upstream = upstream
        if kind is not None:
            self.kind = kind


class UpstreamConnectError(UpstreamError):
    """Connecting (DNS, TCP or TLS) to an upstream failed, or it reset before answering."""

    kind = ErrorKind.CONNECT


class UpstreamTimeout(UpstreamError):
    """An upstream did not answer within a connect, first-byte or between-bytes timeout."""

    status_hint = 504
    kind = ErrorKind.TIMEOUT


class UpstreamProtocolError(UpstreamError):
    """An upstream broke the HTTP/1.1 protocol or closed the connection mid-message."""


class AllUpstreamsFailed(UpstreamError):
    """Every upstream of a route's chain was skipped or failed.

    Raised ``from`` an ``ExceptionGroup`` of the individual failures, as trio's
    ``open_tcp_stream`` does. ``status_hint`` is 504 when the last failure was a timeout.
    """


class CacheCorrupt(ProxyChainError):
    """A stored entry could not be read back intact; it is dropped, never served."""
