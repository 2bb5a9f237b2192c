"""The servers under test and their generated configurations.

Each target is a :class:`procs.Managed` process on a free loopback port, configured in a temp
directory so nothing outside it is read or written:

* ``origin``: :mod:`origin` (and ``origin --down``, the outage stub, on the same port);
* ``ceiling``: :mod:`ceiling`, the Python upper bound, restarted per body size;
* ``nginx``: ``proxy_cache`` in front of the origin, run as the current user with
  ``daemon off`` and every path in the temp dir; ``proxy_cache_lock`` collapses a herd,
  ``proxy_cache_use_stale`` + ``proxy_cache_background_update`` give stale-while-revalidate and
  stale-if-error, ``proxy_cache_revalidate`` sends conditional requests, upstream keep-alive,
  ``tcp_nopush off`` (on stalls 40 ms per response on loopback), ``X-Cache`` from
  ``$upstream_cache_status``;
* ``varnish``: ``varnishd -F`` with ``-s malloc,<memory>`` and a minimal VCL that adds
  ``X-Cache`` and honours ``stale-if-error`` as grace while the origin's health probe fails
  (Varnish reads ``stale-while-revalidate`` as grace by itself);
* ``proxy.py``: the PyPI package ``proxy.py`` as a pass-through reverse proxy (no cache) in
  front of the origin, through :mod:`proxypy_upstream` (its bundled reverse-proxy plugin has
  hard-coded routes), ``--threaded`` (its default threadless mode drops a keep-alive
  connection's second request: the worker's selector fails with ``FileNotFoundError``);
* ``proxychain``: ``python -m proxychain serve --config <toml>`` with the same cache sizes;
* ``static_files``: ``python -m http.server`` over a directory (the gomod scenario's upstream).
"""

from __future__ import annotations

import getpass
import grp
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from procs import Managed, free_port

__all__ = [
    "BENCH_DIR",
    "CacheSizes",
    "ceiling",
    "nginx",
    "origin",
    "proxychain",
    "proxychain_cache_dir",
    "proxypy",
    "proxypy_version",
    "static_files",
    "varnish",
]

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class CacheSizes:
    """Cache budgets given to every proxy, so they compete on equal terms."""

    memory_mib: int = 256
    disk_gib: int = 20
    nginx_keys_zone_mib: int = 128  # ~8,000 keys per MiB: room for the 1M-entry scale run


def origin(tmp: Path, port: int | None = None, *, down: bool = False) -> Managed:
    """The bench origin (or the outage stub) on ``port``."""
    port = port or free_port()
    argv = [sys.executable, str(BENCH_DIR / "origin.py"), f"--port={port}"]
    name = "origin-down" if down else "origin"
    return Managed(name, [*argv, "--down"] if down else argv, port, tmp / f"{name}.log")


def ceiling(tmp: Path, size: int, processes: int) -> Managed:
    """The Python ceiling answering ``size``-byte bodies."""
    port = free_port()
    argv = [
        sys.executable,
        str(BENCH_DIR / "ceiling.py"),
        f"--port={port}",
        f"--size={size}",
        f"--processes={processes}",
    ]
    return Managed("ceiling", argv, port, tmp / "ceiling.log")


_NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=bench:{keys_mib}m
                     max_size={disk_gib}g inactive=7d use_temp_path=off;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 5s;
            proxy_cache bench;
            proxy_cache_valid 200 10m;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            proxy_cache_revalidate on;
            proxy_cache_background_update on;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            add_header X-Cache $upstream_cache_status always;
        }}
    }}
}}
"""


def nginx(
    tmp: Path, origin_port: int, sizes: CacheSizes, workers: int, *, name: str = "nginx"
) -> Managed | None:
    """nginx ``proxy_cache`` in front of the origin; ``None`` if nginx is not installed.

    ``name`` names its home under ``tmp`` (config, cache, logs), so several can run at once.
    """
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        return None
    home = tmp / name
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = ""
    if os.geteuid() == 0:
        # A root master would drop workers to "nobody", who cannot write the temp dir.
        user = f"user {getpass.getuser()} {grp.getgrgid(os.getegid()).gr_name};\n"
    conf = home / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            user=user,
            workers=workers,
            tmp=home,
            keys_mib=sizes.nginx_keys_zone_mib,
            disk_gib=sizes.disk_gib,
            origin_port=origin_port,
            port=port,
        )
    )
    argv = [binary, "-p", str(home), "-c", str(conf), "-e", str(home / "nginx-error.log")]
    return Managed("nginx", argv, port, tmp / f"{name}.log")


_VCL = """\
vcl 4.1;
import std;

backend origin {{
    .host = "127.0.0.1";
    .port = "{origin_port}";
    .connect_timeout = 2s;
    .first_byte_timeout = 60s;
    .between_bytes_timeout = 60s;
    .probe = {{
        .url = "/__health";
        .interval = 0.5s;
        .timeout = 0.5s;
        .window = 3;
        .threshold = 2;
    }}
}}

sub vcl_recv {{
    unset req.http.X-Bench-Stale;
    # Documented grace recipe: short grace while the origin is healthy, the object's full
    # grace (stale-if-error, below) while it is sick.
    if (std.healthy(req.backend_hint)) {{
        set req.grace = 10s;
    }}
}}

sub vcl_hit {{
    if (obj.ttl <= 0s) {{
        set req.http.X-Bench-Stale = "1";
    }}
}}

sub vcl_backend_response {{
    if (beresp.http.Cache-Control ~ "stale-if-error=[0-9]+") {{
        set beresp.grace = std.duration(
            regsub(beresp.http.Cache-Control, ".*stale-if-error=([0-9]+).*", "\\1s"), 10s);
    }}
}}

sub vcl_deliver {{
    if (obj.uncacheable) {{
        set resp.http.X-Cache = "BYPASS";
    }} elsif (req.http.X-Bench-Stale) {{
        set resp.http.X-Cache = "STALE";
    }} elsif (obj.hits > 0) {{
        set resp.http.X-Cache = "HIT";
    }} else {{
        set resp.http.X-Cache = "MISS";
    }}
}}
"""


def varnish(tmp: Path, origin_port: int, sizes: CacheSizes) -> Managed | None:
    """Varnish with malloc storage; ``None`` if varnishd is not installed."""
    binary = shutil.which("varnishd") or (
        "/usr/sbin/varnishd" if Path("/usr/sbin/varnishd").exists() else None
    )
    if binary is None:
        return None
    home = tmp / "varnish"
    home.mkdir(parents=True, exist_ok=True)
    vcl = home / "bench.vcl"
    vcl.write_text(_VCL.format(origin_port=origin_port))
    port = free_port()
    argv = [
        binary,
        "-F",
        "-a",
        f"127.0.0.1:{port}",
        "-T",
        "none",
        "-f",
        str(vcl),
        "-s",
        f"malloc,{sizes.memory_mib}m",
        "-n",
        str(home / "work"),
        "-j",
        "none",
    ]
    return Managed("varnish", argv, port, tmp / "varnish.log")


_PROXYCHAIN_TOML = """\
[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin_port}"

[log]
access_log = false  # as nginx's access_log off

[cache]
dir = "{cache_dir}"
memory_max = "{memory_mib}MiB"
disk_max = "{disk_gib}GiB"

[[route]]
prefix = "{prefix}"
kind = "{kind}"
upstreams = "http://127.0.0.1:{origin_port}"
health_path = "{health_path}"
# The same interval as Varnish's probe of the bench origin (_VCL).
health_interval = "500ms"
"""
# What the bench origin answers 200 to, uncounted; Varnish's probe asks for it too.
_ORIGIN_HEALTH_PATH = "/__health"


def proxychain(
    tmp: Path,
    origin_port: int,
    sizes: CacheSizes,
    workers: int,
    port: int | None = None,
    *,
    name: str = "proxychain",
    prefix: str = "/",
    kind: str = "http",
    health_path: str | None = None,
) -> Managed:
    """proxychain through its CLI with a temp config and cache dir (kept across restarts).

    One route, ``prefix`` of ``kind``, to the origin; ``name`` names its home under ``tmp``.
    ``health_path`` ("" = no health checks) defaults to the bench origin's, as Varnish probes
    it, for an ``http`` route; other kinds front other servers (a static file tree) that
    have no health page and would count the probes.
    """
    if health_path is None:
        health_path = _ORIGIN_HEALTH_PATH if kind == "http" else ""
    home = tmp / name
    (home / "cache").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    admin_port = free_port()
    config = home / "proxychain.toml"
    config.write_text(
        _PROXYCHAIN_TOML.format(
            port=port,
            admin_port=admin_port,
            cache_dir=home / "cache",
            memory_mib=sizes.memory_mib,
            disk_gib=sizes.disk_gib,
            origin_port=origin_port,
            prefix=prefix,
            kind=kind,
            health_path=health_path,
        )
    )
    argv = [sys.executable, "-m", "proxychain", "serve", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    managed = Managed("proxychain", argv, port, tmp / f"{name}.log")
    managed.admin_port = admin_port
    return managed


def proxychain_cache_dir(tmp: Path, name: str = "proxychain") -> Path:
    """The cache dir :func:`proxychain` configures for ``name``."""
    return tmp / name / "cache"


def proxypy_version() -> str | None:
    """The installed ``proxy.py`` distribution's version, or ``None`` when it is missing."""
    try:
        version = importlib.metadata.version("proxy.py")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if importlib.util.find_spec("proxy") is not None else None


def proxypy(tmp: Path, origin_port: int, workers: int) -> Managed | None:
    """proxy.py as a pass-through reverse proxy in front of the origin (no cache), or ``None``
    when the ``proxy.py`` package is not installed (``pip install -e '.[bench]'``).

    ``--threaded`` with ``workers`` acceptor processes (each serves its connections on
    threads); logging at WARNING, as the other targets run without an access log.
    """
    if proxypy_version() is None:
        return None
    port = free_port()
    env = dict(os.environ)
    env[_PROXYPY_ENV] = f"http://127.0.0.1:{origin_port}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "--hostname=127.0.0.1",
        f"--port={port}",
        "--threaded",
        f"--num-acceptors={max(1, workers)}",
        f"--num-workers={max(1, workers)}",
        "--enable-reverse-proxy",
        "--rewrite-host-header",
        "--disable-http-proxy",
        "--plugins=proxypy_upstream.UpstreamReverseProxy",
        "--log-level=WARNING",
        f"--pid-file={tmp / 'proxypy.pid'}",
        "--backlog=1024",
    ]
    return Managed("proxy.py", argv, port, tmp / "proxypy.log", env=env, cwd=tmp)


_PROXYPY_ENV = "PROXYCHAIN_BENCH_UPSTREAM"  # read by proxypy_upstream.UpstreamReverseProxy


def static_files(tmp: Path, root: Path, name: str = "static") -> Managed:
    """``python -m http.server`` over ``root`` on a free loopback port (404 when missing)."""
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    argv += ["--directory", str(root)]
    return Managed(name, argv, port, tmp / f"{name}.log")
