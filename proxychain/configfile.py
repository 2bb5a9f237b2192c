"""The config file: a TOML document read and validated into :class:`~proxychain.settings.Settings`.

The TOML shape is a contract (external checks rely on it)::

    [server]
    listen = "127.0.0.1:8080"
    [cache]
    dir = "/var/cache/proxychain"
    memory_max = "256MiB"
    disk_max = "20GiB"
    [[route]]
    prefix = "/go/"
    upstreams = "https://proxy.golang.org,https://goproxy.cn"
    [route.breaker]
    failures = 5
    open_base = "1s"
    open_cap = "60s"
    [admin]
    listen = "127.0.0.1:9090"
    token = "..."

Every other key is an extension with a named default (:mod:`proxychain.settings`).
Validation happens once, here: an error names the file, the key and what was expected
(:class:`~proxychain.errors.ConfigError`), so the CLI can print one line and exit 2 instead of
a traceback.

Each section is read through a :class:`~proxychain.configtable.ConfigTable`, which types the
values and rejects unknown keys; the checks that span keys (prefixes, upstream chains, breaker
intervals) are here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

from .configtable import ConfigTable
from .errors import ConfigError
from .scalars import parse_duration, parse_listen, parse_size
from .settings import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_BETWEEN_BYTES_TIMEOUT,
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_OPEN_BASE,
    DEFAULT_BREAKER_OPEN_CAP,
    DEFAULT_CACHE_DIR,
    DEFAULT_COALESCE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DISK_MAX,
    DEFAULT_DISK_THREADS,
    DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MEMORY_MAX,
    DEFAULT_MEMORY_OBJECT_MAX,
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_RETRIES,
    DEFAULT_ROUTE_DEADLINE,
    ROUTE_KINDS,
    AdminSettings,
    BreakerSettings,
    CacheSettings,
    LogSettings,
    PrivateSettings,
    RouteKind,
    RouteSettings,
    ServerSettings,
    Settings,
    TimeoutSettings,
)

__all__ = ["default_settings", "load_settings", "parse_settings"]


def _route(table: ConfigTable, kind_default: RouteKind = "http") -> RouteSettings:
    prefix = table.string("prefix", "")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise table.error(
            "prefix", f'expected a path that starts and ends with "/", got {prefix!r}'
        )
    upstreams = table.string("upstreams", "")
    if not upstreams.strip():
        raise table.error("upstreams", 'expected a GOPROXY-style list, e.g. "https://a,https://b"')
    _check_chain(table, upstreams)
    kind = table.string("kind", kind_default)
    if kind not in ROUTE_KINDS:
        raise table.error("kind", f"expected one of {', '.join(ROUTE_KINDS)}, got {kind!r}")
    b = table.table("breaker")
    breaker = BreakerSettings(
        failures=b.integer("failures", DEFAULT_BREAKER_FAILURES),
        open_base=b.convert("open_base", DEFAULT_BREAKER_OPEN_BASE, parse_duration),
        open_cap=b.convert("open_cap", DEFAULT_BREAKER_OPEN_CAP, parse_duration),
        failure_ratio=b.convert("failure_ratio", None, _ratio),
        window=b.integer("window", 20, minimum=1),
        min_requests=b.integer("min_requests", 10, minimum=1),
    )
    b.finish()
    if breaker.open_cap < breaker.open_base:
        raise b.error("open_cap", f"expected a duration >= open_base ({breaker.open_base}s)")
    t = table.table("timeouts")
    timeouts = TimeoutSettings(
        connect=t.convert("connect", DEFAULT_CONNECT_TIMEOUT, _positive_duration),
        first_byte=t.convert("first_byte", DEFAULT_FIRST_BYTE_TIMEOUT, _positive_duration),
        between_bytes=t.convert("between_bytes", DEFAULT_BETWEEN_BYTES_TIMEOUT, _positive_duration),
        deadline=t.convert("deadline", DEFAULT_ROUTE_DEADLINE, _positive_duration),
    )
    t.finish()
    private = []
    for p in table.tables("private"):
        patterns = p.strings("patterns")
        ups = p.strings("upstreams")
        if not patterns:
            raise p.error("patterns", 'expected at least one pattern, e.g. "corp.example.com/*"')
        if not ups:
            raise p.error("upstreams", "expected at least one upstream URL from the route's chain")
        p.finish()
        private.append(PrivateSettings(patterns=patterns, upstreams=ups))
    route = RouteSettings(
        prefix=prefix,
        upstreams=upstreams,
        kind=kind,
        preserve_host=bool(table.boolean("preserve_host", False)),
        breaker=breaker,
        timeouts=timeouts,
        retries=table.integer("retries", DEFAULT_RETRIES),
        health_path=table.string("health_path", ""),
        health_interval=table.convert(
            "health_interval", DEFAULT_HEALTH_INTERVAL, _positive_duration
        ),
        negative_ttl=table.convert("negative_ttl", DEFAULT_NEGATIVE_TTL, parse_duration),
        swr=table.convert("stale_while_revalidate", None, parse_duration),
        max_stale=table.convert("max_stale", None, parse_duration),
        ttl=table.convert("ttl", None, parse_duration),
        ignore_client_no_cache=table.boolean("ignore_client_no_cache", None),
        coalesce_timeout=table.convert(
            "coalesce_timeout", DEFAULT_COALESCE_TIMEOUT, _positive_duration
        ),
        finish_fill_on_disconnect=bool(table.boolean("finish_fill_on_disconnect", True)),
        private=tuple(private),
        ca_file=table.string("ca_file", ""),
        file_hosts=table.strings("file_hosts"),
    )
    if route.health_path and not route.health_path.startswith("/"):
        raise table.error(
            "health_path", f'expected a path starting with "/", got {route.health_path!r}'
        )
    table.finish()
    return route


def _check_chain(table: ConfigTable, text: str) -> None:
    """Validate the chain's syntax early so the error names the key."""
    for element in re.split(r"[,|]", text):
        element = element.strip()
        if element == "off":
            continue
        if element == "direct":
            raise table.error(
                "upstreams",
                '"direct" (fetching from version control) is not supported; '
                'list upstream proxy URLs, or "off" to refuse',
            )
        if not re.match(r"^https?://[^/\s]+", element):
            raise table.error(
                "upstreams",
                f"expected http:// or https:// URLs separated by , or |, got {element!r}",
            )


def _ratio(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ValueError("expected a ratio in (0, 1]")


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected a duration greater than zero")
    return seconds


def parse_settings(data: Mapping[str, Any], *, source: str = "<config>") -> Settings:
    """Validate a parsed TOML document into :class:`Settings`.

    Raises:
        ConfigError: naming ``source``, the key and what was expected.
    """
    root = ConfigTable(data, source, "")
    s = root.table("server")
    host, port = s.convert("listen", ("127.0.0.1", 8080), parse_listen)
    server = ServerSettings(
        host=host,
        port=port,
        node_name=s.string("node_name", ""),
        max_header_bytes=s.convert("max_header_bytes", DEFAULT_MAX_HEADER_BYTES, parse_size),
        keepalive_timeout=s.convert("keepalive_timeout", DEFAULT_KEEPALIVE_TIMEOUT, parse_duration),
        header_timeout=s.convert("header_timeout", DEFAULT_HEADER_TIMEOUT, _positive_duration),
        graceful_timeout=s.convert("graceful_timeout", DEFAULT_GRACEFUL_TIMEOUT, parse_duration),
        workers=s.integer("workers", 1, minimum=1),
    )
    if server.node_name and not re.fullmatch(
        r"[A-Za-z0-9!#$%&'*+.^_`|~:\-\[\]]+", server.node_name
    ):
        raise s.error("node_name", "expected a token (letters, digits, . - _ :), no spaces")
    s.finish()
    c = root.table("cache")
    cache = CacheSettings(
        dir=Path(c.string("dir", DEFAULT_CACHE_DIR)),
        memory_max=c.convert("memory_max", DEFAULT_MEMORY_MAX, parse_size),
        memory_object_max=c.convert("memory_object_max", DEFAULT_MEMORY_OBJECT_MAX, parse_size),
        disk_max=c.convert("disk_max", DEFAULT_DISK_MAX, parse_size),
        disk_threads=c.integer("disk_threads", DEFAULT_DISK_THREADS, minimum=1),
    )
    c.finish()
    routes = tuple(_route(t) for t in root.tables("route"))
    prefixes = [r.prefix for r in routes]
    for i, prefix in enumerate(prefixes):
        if prefix in prefixes[:i]:
            raise ConfigError(
                f"duplicate prefix {prefix!r}", source=source, key=f"route[{i}].prefix"
            )
    a = root.table("admin")
    admin_listen = a.string("listen", DEFAULT_ADMIN_LISTEN)
    if admin_listen:
        admin_host, admin_port = a.convert("listen", ("127.0.0.1", 9090), parse_listen)
    else:
        admin_host, admin_port = "127.0.0.1", 0
    admin = AdminSettings(
        host=admin_host,
        port=admin_port,
        enabled=bool(admin_listen),
        token=a.string("token", "") or os.environ.get("PROXYCHAIN_ADMIN_TOKEN", ""),
    )
    a.finish()
    lg = root.table("log")
    level = lg.string("level", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise lg.error("level", f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    fmt = lg.string("format", "text")
    if fmt not in {"text", "json"}:
        raise lg.error("format", f'expected "text" or "json", got {fmt!r}')
    log = LogSettings(
        level=level,
        format=cast("Literal['text', 'json']", fmt),
        access_log=bool(lg.boolean("access_log", True)),
    )
    lg.finish()
    root.finish()
    return Settings(server=server, cache=cache, routes=routes, admin=admin, log=log, source=source)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a TOML config file.

    Raises:
        ConfigError: the file is missing, is not TOML, or a value is wrong.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("no such file", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    return parse_settings(data, source=source)


def default_settings() -> Settings:
    """The built-in configuration ``proxychain serve`` runs without ``--config``."""
    text = resources.files("proxychain").joinpath("default.toml").read_text("utf-8")
    return parse_settings(tomllib.loads(text), source="<built-in default>")
