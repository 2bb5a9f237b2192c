"""Configuration: frozen settings values, TOML loading and validation.

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

Every other key is an extension with a named default below. Validation happens once, here:
an error names the file, the key and what was expected (:class:`~proxychain.errors.ConfigError`),
so the CLI can print one line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

from .errors import ConfigError

__all__ = [
    "AdminSettings",
    "BreakerSettings",
    "CacheSettings",
    "LogSettings",
    "RouteSettings",
    "ServerSettings",
    "Settings",
    "TimeoutSettings",
    "default_settings",
    "load_settings",
    "parse_duration",
    "parse_settings",
    "parse_size",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

# ---- named defaults (units in the name or the comment) ---------------------------------------

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
DEFAULT_CACHE_DIR = "./proxychain-cache"
DEFAULT_MEMORY_MAX = 256 * MiB
DEFAULT_DISK_MAX = 20 * GiB
# Bodies up to this size are kept whole in the memory tier; larger ones only stream from disk.
# 8 MiB covers nearly every Go .mod/.info, PyPI page and npm packument while keeping a
# 256 MiB tier from being flushed by a handful of large archives.
DEFAULT_MEMORY_OBJECT_MAX = 8 * MiB
# h11's own default is 16 KiB; package-index requests carry few headers, but some CI systems
# send long cookies and tokens. 64 KiB is nginx's large_client_header_buffers ceiling (4 x 16k).
DEFAULT_MAX_HEADER_BYTES = 64 * KiB
DEFAULT_KEEPALIVE_TIMEOUT = 75 * SECONDS  # nginx's keepalive_timeout default
DEFAULT_HEADER_TIMEOUT = 30 * SECONDS  # a client must send a whole request head in this time
DEFAULT_GRACEFUL_TIMEOUT = 30 * SECONDS  # in-flight responses may finish within this on SIGTERM
DEFAULT_CONNECT_TIMEOUT = 10 * SECONDS
DEFAULT_FIRST_BYTE_TIMEOUT = 60 * SECONDS  # upstreams build large zips on demand
DEFAULT_BETWEEN_BYTES_TIMEOUT = 60 * SECONDS
DEFAULT_ROUTE_DEADLINE = 120 * SECONDS  # the whole chain, retries included, to the first byte
DEFAULT_NEGATIVE_TTL = 60 * SECONDS  # 404/410 with no freshness information
DEFAULT_COALESCE_TIMEOUT = 30 * SECONDS  # a waiter waits this long for the leader's head
DEFAULT_HEALTH_INTERVAL = 10 * SECONDS
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_OPEN_BASE = 1 * SECONDS
DEFAULT_BREAKER_OPEN_CAP = 60 * SECONDS
DEFAULT_RETRIES = 1  # extra attempts on the same upstream after a connect error or reset
DEFAULT_DISK_THREADS = 8  # concurrent blocking file calls

RouteKind = Literal["http", "goproxy", "pypi", "npm"]
ROUTE_KINDS: tuple[RouteKind, ...] = ("http", "goproxy", "pypi", "npm")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The data-plane listener."""

    host: str = "127.0.0.1"
    port: int = 8080
    node_name: str = ""  # Via pseudonym; "" means "proxychain-<hostname>-<port>"
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    workers: int = 1

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """The two tiers."""

    dir: Path = Path(DEFAULT_CACHE_DIR)
    memory_max: int = DEFAULT_MEMORY_MAX
    memory_object_max: int = DEFAULT_MEMORY_OBJECT_MAX
    disk_max: int = DEFAULT_DISK_MAX
    disk_threads: int = DEFAULT_DISK_THREADS


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """``[route.breaker]``: consecutive failures that open it (0: off) and the open interval."""

    failures: int = DEFAULT_BREAKER_FAILURES
    open_base: float = DEFAULT_BREAKER_OPEN_BASE
    open_cap: float = DEFAULT_BREAKER_OPEN_CAP
    failure_ratio: float | None = None
    window: int = 20
    min_requests: int = 10


@dataclass(frozen=True, kw_only=True)
class TimeoutSettings:
    """Per-upstream timeouts and the route's total deadline, in seconds."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    first_byte: float = DEFAULT_FIRST_BYTE_TIMEOUT
    between_bytes: float = DEFAULT_BETWEEN_BYTES_TIMEOUT
    deadline: float = DEFAULT_ROUTE_DEADLINE


@dataclass(frozen=True, kw_only=True)
class PrivateSettings:
    """Paths matching ``patterns`` may only be sent to ``upstreams``."""

    patterns: tuple[str, ...]
    upstreams: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RouteSettings:
    """One ``[[route]]``: a path prefix, its upstream chain and its caching knobs."""

    prefix: str
    upstreams: str
    kind: RouteKind = "http"
    preserve_host: bool = False
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    retries: int = DEFAULT_RETRIES
    health_path: str = ""  # "" disables active health checks
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    swr: float | None = None  # stale-while-revalidate window when the upstream sends none
    max_stale: float | None = None  # stale-if-error window when the upstream sends none
    ttl: float | None = None  # freshness lifetime when the upstream sends none
    ignore_client_no_cache: bool | None = None  # None: the route kind decides
    coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT
    finish_fill_on_disconnect: bool = True
    private: tuple[PrivateSettings, ...] = ()
    ca_file: str = ""  # extra trust anchors for https upstreams
    file_hosts: tuple[str, ...] = ()  # pypi: hosts whose links are rewritten through the route


@dataclass(frozen=True, kw_only=True)
class AdminSettings:
    """The admin plane (hypercorn); ``listen = ""`` turns it off."""

    host: str = "127.0.0.1"
    port: int = 9090
    enabled: bool = True
    token: str = ""


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    """Logging: level, and the access log's format."""

    level: str = "INFO"
    format: Literal["text", "json"] = "text"
    access_log: bool = True


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything proxychain needs to run, validated."""

    server: ServerSettings = field(default_factory=ServerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    routes: tuple[RouteSettings, ...] = ()
    admin: AdminSettings = field(default_factory=AdminSettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: str = "<defaults>"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# ---- scalar parsers ---------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB|K|M|G|T)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 1000,
    "m": MiB,
    "mib": MiB,
    "mb": 1000**2,
    "g": GiB,
    "gib": GiB,
    "gb": 1000**3,
    "t": 1024 * GiB,
    "tib": 1024 * GiB,
    "tb": 1000**4,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like ``"256MiB"``; raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a non-negative size")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    raise ValueError('expected a size such as 1048576, "512KiB", "256MiB" or "20GiB"')


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"1s"``, ``"500ms"``, ``"1h30m"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a non-negative duration")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos = 0
        total = 0.0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
            pos = match.end()
        else:
            if pos == len(text) and pos > 0:
                return total
    raise ValueError('expected a duration such as 30, "500ms", "10s", "5m", "1h" or "7d"')


def parse_listen(value: object) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) to a pair; raises ``ValueError``."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8080"')
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8080"')
    return host, int(port_text)


# ---- the table walker -------------------------------------------------------------------------


class _Table:
    """A TOML table being read: typed getters that name file and key in every error."""

    def __init__(self, data: Mapping[str, Any], source: str, path: str) -> None:
        self._data = data
        self._source = source
        self._path = path
        self._used: set[str] = set()

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, source=self._source, key=self._key(name))

    def has(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        self._used.add(name)
        return self._data.get(name)

    def convert(self, name: str, default: Any, parser: Any) -> Any:
        if name not in self._data:
            return default
        try:
            return parser(self.raw(name))
        except ValueError as exc:
            raise self.error(name, f"{exc}, got {self._data[name]!r}") from None

    def string(self, name: str, default: str) -> str:
        value = self.raw(name) if name in self._data else default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value

    def boolean(self, name: str, default: bool | None) -> bool | None:
        value = self.raw(name) if name in self._data else default
        if value is not None and not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self.raw(name) if name in self._data else default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.raw(name) if name in self._data else []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def table(self, name: str) -> _Table:
        value = self.raw(name) if name in self._data else {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {value!r}")
        return _Table(value, self._source, self._key(name))

    def tables(self, name: str) -> list[_Table]:
        value = self.raw(name) if name in self._data else []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, "expected an array of tables ([[" + name + "]])")
        return [_Table(v, self._source, f"{self._key(name)}[{i}]") for i, v in enumerate(value)]

    def finish(self) -> None:
        """Reject unknown keys: a typo must not silently fall back to a default."""
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _route(table: _Table, kind_default: RouteKind = "http") -> RouteSettings:
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


def _check_chain(table: _Table, text: str) -> None:
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
    root = _Table(data, source, "")
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
