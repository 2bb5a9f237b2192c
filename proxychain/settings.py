"""Configuration values: the frozen settings proxychain runs with, and their named defaults.

Every field has a named default (units in the name or the comment), so a config file only
lists what it changes. Values here are already valid: reading a TOML file into them, with
errors that name the file and the key, is :mod:`proxychain.configfile`'s job
(``load_settings``, ``parse_settings``, ``default_settings``). The spelling of sizes,
durations and listen addresses lives in :mod:`proxychain.scalars`; its parsers are
re-exported here, where callers have always found them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .scalars import SECONDS, GiB, KiB, MiB, parse_duration, parse_listen, parse_size

__all__ = [
    "AdminSettings",
    "BreakerSettings",
    "CacheSettings",
    "LogSettings",
    "RouteSettings",
    "ServerSettings",
    "Settings",
    "TimeoutSettings",
    "parse_duration",
    "parse_listen",
    "parse_size",
]

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
