"""The admin plane: metrics, health, purge and a status page, as a small ASGI app.

Theory of operation. The admin plane is a second listener in the proxy's process and nursery,
served by hypercorn's trio worker (low traffic, so an ASGI server earns its place here while the
data plane stays on bare h11). :class:`AdminApp` is a plain ASGI callable over an
:class:`AdminBackend` that the proxy implements; it owns no state of its own and never touches
the cache directly.

Routes are a table of ``path -> {method: handler}``: an unknown path answers 404, a known path
with another method 405 with ``Allow`` (RFC 9110 §15.5.6). Read-only endpoints are open;
mutating ones (``POST /admin/purge``) need ``Authorization: Bearer <token>`` (RFC 6750 §2.1),
compared in constant time with :func:`hmac.compare_digest`. Without a configured token they are
disabled outright (403) rather than open; a missing or wrong token is 401 with
``WWW-Authenticate: Bearer`` (RFC 6750 §3). Every answer is ``Cache-Control: no-store``: these
figures are live and must never be cached by an intermediary (RFC 9111 §5.2.2.5).

The token comes from ``[admin] token`` or, when that is empty, the environment variable
``PROXYCHAIN_ADMIN_TOKEN`` (:func:`resolve_token`), so secrets need not live in the file.

``GET /admin/stats`` returns the backend's JSON as is. The status page expects this shape
(all times are wall-clock seconds since the epoch)::

    {"generated_at": 1700000000.0,
     "routes": [{"name": "/go/", "requests": 10, "hits": 8, "hit_ratio": 0.8, "bytes_sent": 4096}],
     "upstreams": [{"name": "golang", "route": "/go/", "state": "closed", "failures": 0,
                    "next_probe_at": null}],
     "tiers": [{"name": "memory", "bytes": 1024, "entries": 3, "budget": 65536}],
     "recent_errors": [{"at": 1700000000.0, "route": "/go/", "message": "..."}],
     "hit_ratio_history": [[1699999990.0, 0.75], [1700000000.0, 0.8]]}

Under ``serve --workers N`` the document also has ``"workers": N`` and its figures are the
whole server's (:mod:`proxychain.workerstats`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .errors import ConfigError, ProxyChainError
from .settings import Settings, parse_listen

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

__all__ = [
    "ADMIN_GRACEFUL_TIMEOUT_SECONDS",
    "ADMIN_TOKEN_ENV",
    "DEFAULT_ADMIN_LISTEN",
    "MAX_ADMIN_BODY_BYTES",
    "PURGE_TIMEOUT_SECONDS",
    "AdminApp",
    "AdminBackend",
    "purge_remote",
    "resolve_token",
    "serve_admin",
    "start_admin",
]

DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
ADMIN_TOKEN_ENV = "PROXYCHAIN_ADMIN_TOKEN"
# A purge request is one small JSON object; anything bigger is a mistake or an attack.
MAX_ADMIN_BODY_BYTES = 64 * 1024
# Long enough to finish a scrape in flight; the admin plane must not hold up process exit.
ADMIN_GRACEFUL_TIMEOUT_SECONDS = 3.0
# The CLI's patience with the admin listener (a purge of a large prefix walks the disk tier).
PURGE_TIMEOUT_SECONDS = 30.0

ADMIN_LOG = logging.getLogger("proxychain.admin")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AdminBackend(Protocol):
    """What the proxy provides to the admin plane."""

    def stats(self) -> dict[str, object]:
        """JSON-able live figures, in the shape given in the module docstring."""
        ...

    def ready(self) -> tuple[bool, list[str]]:
        """Whether the proxy should receive traffic, and the reasons when it should not."""
        ...

    async def purge(self, *, url: str | None, prefix: str | None) -> int:
        """Remove the entry for ``url``, or every entry under ``prefix``; return how many."""
        ...

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        ...


def resolve_token(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """The admin token: ``[admin] token`` if set, else ``PROXYCHAIN_ADMIN_TOKEN``, else None."""
    return configured or environ.get(ADMIN_TOKEN_ENV) or None


class _Reply:
    """One complete response (the admin plane never streams)."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.status = status
        self.body = body
        self.headers = (("content-type", content_type), ("cache-control", "no-store"), *extra)

    @classmethod
    def json(cls, status: int, value: object, *extra: tuple[str, str]) -> _Reply:
        data = json.dumps(value, separators=(",", ":")).encode()
        return cls(status, data, "application/json", extra)

    @classmethod
    def error(cls, status: int, message: str, *extra: tuple[str, str]) -> _Reply:
        return cls.json(status, {"error": message}, *extra)


class _BodyTooLarge(Exception):
    pass


Handler = Callable[[Scope, Receive], Awaitable[_Reply]]


class AdminApp:
    """The admin ASGI application.

    Args:
        backend: the proxy's side of the admin plane.
        token: the bearer token for mutating endpoints; ``None`` or ``""`` disables them.
    """

    def __init__(self, backend: AdminBackend, *, token: str | None) -> None:
        self._backend = backend
        self._token = token.encode() if token else None
        self._page = resources.files(__package__).joinpath("status_page.html").read_bytes()
        self._routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._status_page},
            "/metrics": {"GET": self._metrics},
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/admin/stats": {"GET": self._stats},
            "/admin/purge": {"POST": self._purge},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not spoken here
            return
        reply = await self._dispatch(scope, receive)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(n.encode(), v.encode()) for n, v in reply.headers],
            }
        )
        body = b"" if scope["method"] == "HEAD" else reply.body
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: Scope, receive: Receive) -> _Reply:
        methods = self._routes.get(scope["path"])
        if methods is None:
            return _Reply.error(404, "not found")
        method = scope["method"]
        handler = methods.get("GET" if method == "HEAD" and "GET" in methods else method)
        if handler is None:
            allow = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            return _Reply.error(405, "method not allowed", ("allow", allow))
        return await handler(scope, receive)

    # -- read-only endpoints --------------------------------------------------------------------

    async def _status_page(self, scope: Scope, receive: Receive) -> _Reply:
        return _Reply(200, self._page, "text/html; charset=utf-8")

    async def _metrics(self, scope: Scope, receive: Receive) -> _Reply:
        body, content_type = self._backend.metrics()
        return _Reply(200, body, content_type)

    async def _healthz(self, scope: Scope, receive: Receive) -> _Reply:
        return _Reply(200, b"ok\n", "text/plain; charset=utf-8")

    async def _readyz(self, scope: Scope, receive: Receive) -> _Reply:
        ok, reasons = self._backend.ready()
        return _Reply.json(200 if ok else 503, {"ready": ok, "reasons": reasons})

    async def _stats(self, scope: Scope, receive: Receive) -> _Reply:
        return _Reply.json(200, self._backend.stats())

    # -- mutating endpoints ---------------------------------------------------------------------

    def _refusal(self, scope: Scope) -> _Reply | None:
        """None when the request carries the right bearer token, else the reply refusing it."""
        if self._token is None:
            return _Reply.error(403, "admin token not configured; mutating endpoints disabled")
        presented = b""
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                scheme, _, credentials = bytes(value).partition(b" ")
                if scheme.lower() == b"bearer":  # the scheme is case-insensitive, RFC 9110 §11.1
                    presented = credentials.strip()
        if not hmac.compare_digest(presented, self._token):
            return _Reply.error(
                401, "missing or wrong bearer token", ("www-authenticate", "Bearer")
            )
        return None

    async def _purge(self, scope: Scope, receive: Receive) -> _Reply:
        refusal = self._refusal(scope)
        if refusal is not None:
            return refusal
        try:
            document = json.loads(await _read_body(receive, MAX_ADMIN_BODY_BYTES))
        except _BodyTooLarge:
            return _Reply.error(413, f"body larger than {MAX_ADMIN_BODY_BYTES} bytes")
        except (ValueError, UnicodeDecodeError):
            return _Reply.error(400, "body is not JSON")
        target = _purge_target(document)
        if target is None:
            return _Reply.error(400, 'expected {"url": "..."} or {"prefix": "..."}')
        try:
            purged = await self._backend.purge(url=target[0], prefix=target[1])
        except ProxyChainError as exc:
            return _Reply.error(exc.status_hint, exc.reason)
        return _Reply.json(200, {"purged": purged})


def _purge_target(document: object) -> tuple[str | None, str | None] | None:
    """(url, None) or (None, prefix) from a purge body, or None when it is malformed."""
    if not isinstance(document, dict) or len(document) != 1:
        return None
    ((key, value),) = document.items()
    if not isinstance(value, str) or not value:
        return None
    if key == "url":
        return _local_target(value), None
    if key == "prefix":
        return None, _local_target(value)
    return None


def _local_target(target: str) -> str:
    """The origin-form target entries are stored under: an absolute URL loses its scheme and
    authority (``http://cache:8080/go/x`` and ``/go/x`` name the same entry)."""
    parts = urllib.parse.urlsplit(target)
    if not (parts.scheme and parts.netloc):
        return target
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


# -- serving ------------------------------------------------------------------------------------


async def serve_admin(
    app: AdminApp,
    listen: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = ADMIN_GRACEFUL_TIMEOUT_SECONDS,
) -> None:
    """Serve the admin app with hypercorn's trio worker until ``shutdown_trigger`` returns.

    Args:
        app: the admin application.
        listen: ``"host:port"``; port 0 picks a free port.
        task_status: receives the bound port once the socket listens.
        shutdown_trigger: awaited in the background; when it returns, hypercorn stops accepting
            and gives open requests ``graceful_timeout`` seconds. Without it, serving stops
            only by cancellation.
        graceful_timeout: seconds open requests get to finish after the trigger.

    Raises:
        ConfigError: ``listen`` is not ``host:port``.
    """
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(str(exc), key="admin.listen") from None
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    # hypercorn's own messages go through proxychain's logging setup (so JSON-lines logs stay
    # JSON); requests to the admin plane are not worth an access-log line each.
    config.errorlog = ADMIN_LOG
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        # hypercorn reports its binds as URLs ("http://127.0.0.1:40123"); the port is what
        # callers (and tests on port 0) need.
        # AdminApp speaks ASGI with plain dicts; hypercorn's signature spells out TypedDicts.
        asgi = cast("ASGIFramework", app)
        binds: list[str] = await nursery.start(
            partial(serve, asgi, config, shutdown_trigger=shutdown_trigger, mode="asgi")
        )
        task_status.started(int(binds[0].rpartition(":")[2]))


async def start_admin(
    nursery: trio.Nursery, backend: AdminBackend, settings: Settings, shutdown: trio.Event
) -> int:
    """Start the admin plane in ``nursery`` as configured by ``settings.admin``.

    The token is ``[admin] token`` or ``PROXYCHAIN_ADMIN_TOKEN``; hypercorn shuts down
    gracefully once ``shutdown`` is set. The caller checks ``settings.admin.enabled``.

    Returns:
        The bound port.
    """
    admin = settings.admin
    app = AdminApp(backend, token=resolve_token(admin.token, os.environ))
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    port: int = await nursery.start(
        partial(serve_admin, app, f"{host}:{admin.port}", shutdown_trigger=shutdown.wait)
    )
    return port


# -- client side of `proxychain purge` -------------------------------------------------------


async def purge_remote(
    admin_url: str, token: str, url: str | None = None, prefix: str | None = None
) -> int:
    """Ask a running proxy's admin plane to purge ``url`` or everything under ``prefix``.

    Args:
        admin_url: the admin listener's base URL, e.g. ``"http://127.0.0.1:9090"``.
        token: the admin bearer token.
        url, prefix: exactly one of them.

    Returns:
        How many entries the proxy removed.

    Raises:
        ValueError: not exactly one of ``url`` and ``prefix`` was given.
        ProxyChainError: the request failed; ``status_hint`` is the admin plane's status
            (401, 403, 400, ...) or 502 when it could not be reached.
    """
    if (url is None) == (prefix is None):
        raise ValueError("give exactly one of url and prefix")
    document = {"url": url} if url is not None else {"prefix": prefix}
    endpoint = admin_url.rstrip("/") + "/admin/purge"
    reply = await trio.to_thread.run_sync(_post_json, endpoint, token, document)
    purged = reply.get("purged")
    if not isinstance(purged, int):
        raise ProxyChainError(f"unexpected reply from {endpoint}: {reply!r}", status_hint=502)
    return purged


def _post_json(endpoint: str, token: str, document: object) -> dict[str, object]:
    request = urllib.request.Request(
        endpoint,
        data=json.dumps(document).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    # An empty ProxyHandler: the admin plane is local, never reach it through $http_proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=PURGE_TIMEOUT_SECONDS) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        raise ProxyChainError(
            f"{endpoint}: {exc.code} {_error_message(detail)}", status_hint=exc.code
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ProxyChainError(f"{endpoint}: {exc}", status_hint=502) from exc
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ProxyChainError(f"{endpoint}: reply is not JSON", status_hint=502) from exc
    if not isinstance(value, dict):
        raise ProxyChainError(f"{endpoint}: reply is not a JSON object", status_hint=502)
    return value


def _error_message(detail: str) -> str:
    try:
        value = json.loads(detail)
    except ValueError:
        return detail.strip()
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return str(value["error"])
    return detail.strip()
