"""Where an upstream lives and how to reach it: its URL, its timeouts, and opening a stream.

An :class:`Origin` is parsed once from configuration and names scheme, host, port and a base
path; :func:`open_upstream_stream` turns it into a connected TCP or TLS stream. The pool in
:mod:`proxychain.upstream` takes the opener as a :data:`Connector`, so tests can hand it memory
streams instead; it also enforces the :class:`Timeouts` and translates the errors raised here.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .errors import ConfigError

__all__ = [
    "DEFAULT_BETWEEN_BYTES_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_FIRST_BYTE_TIMEOUT",
    "Connector",
    "Origin",
    "Timeouts",
    "create_ssl_context",
    "open_upstream_stream",
]

SECONDS = 1.0

DEFAULT_CONNECT_TIMEOUT = 10 * SECONDS
DEFAULT_FIRST_BYTE_TIMEOUT = 30 * SECONDS
DEFAULT_BETWEEN_BYTES_TIMEOUT = 30 * SECONDS

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Per-upstream timeouts in seconds, on trio's clock (virtual under ``MockClock``).

    ``connect`` bounds TCP plus TLS, ``first_byte`` the wait for the final response head after
    the request was sent, and ``between_bytes`` each receive of the body (and each send of the
    request).
    """

    connect: float = DEFAULT_CONNECT_TIMEOUT
    first_byte: float = DEFAULT_FIRST_BYTE_TIMEOUT
    between_bytes: float = DEFAULT_BETWEEN_BYTES_TIMEOUT


@dataclass(frozen=True, slots=True, kw_only=True)
class Origin:
    """Where an upstream lives; ``base_path`` is prefixed to every request target."""

    scheme: str
    host: str
    port: int
    base_path: str = ""

    @classmethod
    def parse(cls, url: str) -> Origin:
        """Parse ``http[s]://host[:port][/base]``.

        Raises:
            ConfigError: not an http(s) URL with a host, or it has userinfo, query or fragment.
        """
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"invalid upstream URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"invalid upstream URL {url!r}: scheme must be http or https")
        if not parts.hostname:
            raise ConfigError(f"invalid upstream URL {url!r}: no host")
        if parts.username is not None or parts.query or parts.fragment:
            raise ConfigError(f"invalid upstream URL {url!r}: no userinfo, query or fragment")
        return cls(
            scheme=scheme,
            host=parts.hostname,
            port=_DEFAULT_PORTS[scheme] if port is None else port,
            base_path=parts.path.rstrip("/"),
        )

    @property
    def authority(self) -> str:
        """The ``Host`` field value (RFC 9110 §7.2): the port only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS.get(self.scheme) else f"{host}:{self.port}"

    def target(self, target: str) -> str:
        """The request target sent upstream for the origin-form ``target``."""
        return self.base_path.rstrip("/") + target

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}"


Connector = Callable[[Origin], Awaitable[trio.abc.Stream]]


def create_ssl_context(*, ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context (system trust store, plus ``ca_file`` when given)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_upstream_stream(
    origin: Origin, *, ssl_context: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    """Open TCP (TCP_NODELAY stays on, trio's default) and, for https, complete a TLS handshake.

    SNI and certificate verification use ``origin.host``. Exceptions are left to the caller
    (:class:`~proxychain.upstream.UpstreamPool` translates them).
    """
    stream: trio.abc.Stream = await trio.open_tcp_stream(origin.host, origin.port)
    if origin.scheme != "https":
        return stream
    # https_compatible: most servers close without close_notify; h11's framing catches
    # truncation of Content-Length and chunked bodies anyway.
    tls = trio.SSLStream(
        stream,
        ssl_context or create_ssl_context(),
        server_hostname=origin.host,
        https_compatible=True,
    )
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls
