"""Command line: ``proxychain serve | check-config | verify | warm | purge``.

User mistakes (a bad config, a missing file) print one line and exit with status 2; only bugs
print tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__
from .clock import Clock
from .configfile import default_settings, load_settings
from .errors import ConfigError
from .logs import configure_logging
from .settings import Settings, parse_listen

if TYPE_CHECKING:
    from .balance import Seat
    from .proxy import Proxy

__all__ = ["main", "run"]

log = logging.getLogger("proxychain")

EXIT_USAGE = 2


async def run(
    settings: Settings,
    *,
    handle_signals: bool = True,
    listeners: list[trio.SocketListener] | None = None,
    worker_id: str | None = None,
    seat: Seat | None = None,
    share_dir: Path | None = None,
    watch: Callable[[trio.Event], Awaitable[None]] | None = None,
    label: str = "",
) -> None:
    """Run the proxy (and its admin plane) until SIGINT/SIGTERM, then shut down gracefully.

    Args:
        settings: what to run.
        handle_signals: stop on SIGINT/SIGTERM (the first drains, a second stops at once).
        listeners: an already-bound socket to serve (workers share the parent's).
        worker_id: a worker's name, sent in ``x-proxychain-worker``.
        seat: a worker's place on the board its siblings balance accepts by.
        share_dir: where workers share their stats documents (``workerstats``).
        watch: another task that may set the shutdown event (a worker watching its parent).
        label: logged as "<label> serving" once the listener accepts (a worker's name).
    """
    from .listen import serve
    from .proxy import open_proxy
    from .status import build_stats
    from .workerstats import SiblingStats

    clock = Clock()
    shutdown = trio.Event()
    async with open_proxy(settings, clock=clock) as proxy, trio.open_nursery() as nursery:

        async def serve_then_stop(*, task_status: trio.TaskStatus[int]) -> None:
            # serve() returns once drained; the signal watcher and admin plane go with it.
            await serve(
                proxy,
                settings.server,
                clock=clock,
                shutdown=shutdown,
                task_status=task_status,
                listeners=listeners,
                worker_id=worker_id,
                seat=seat,
                on_listening=proxy.set_listening,
            )
            nursery.cancel_scope.cancel()

        if share_dir is not None:
            proxy.sibling_stats = SiblingStats(share_dir, partial(build_stats, proxy))
            nursery.start_soon(proxy.sibling_stats.run)
        if handle_signals:
            nursery.start_soon(_wait_for_signals, shutdown)
        if watch is not None:
            nursery.start_soon(watch, shutdown)
        port = await nursery.start(serve_then_stop)
        log.info(
            "proxychain %s listening on %s:%d (%d routes, cache in %s)%s",
            __version__,
            settings.server.host,
            port,
            len(settings.routes),
            settings.cache.dir,
            f", worker {worker_id}" if worker_id else "",
        )
        for route in settings.routes:
            log.info("route %s (%s) -> %s", route.prefix, route.kind, route.upstreams)
        if label:
            log.info("%s serving", label)
        await _start_admin(nursery, proxy, settings, shutdown)
    log.info("stopped")


async def _start_admin(
    nursery: trio.Nursery, proxy: Proxy, settings: Settings, shutdown: trio.Event
) -> None:
    if not settings.admin.enabled:
        return
    from .admin import start_admin

    port = await start_admin(nursery, proxy, settings, shutdown)
    log.info("admin plane on http://%s:%d/", settings.admin.host, port)


async def _wait_for_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            if shutdown.is_set():
                raise KeyboardInterrupt  # a second signal: stop now
            shutdown.set()


def _load(path: str | None) -> Settings:
    return default_settings() if path is None else load_settings(path)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if args.listen:
        try:
            host, port = parse_listen(args.listen)
        except ValueError as exc:
            raise ConfigError(str(exc), source="--listen") from None
        settings = settings.replace(server=_replace(settings.server, host=host, port=port))
    if args.cache_dir:
        settings = settings.replace(cache=_replace(settings.cache, dir=Path(args.cache_dir)))
    if args.workers:
        settings = settings.replace(server=_replace(settings.server, workers=args.workers))
    configure_logging(settings.log)
    if settings.server.workers > 1:
        from .workers import run_workers

        return run_workers(settings)
    trio.run(run, settings)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.path)
    effective = asdict(settings)
    print(json.dumps(effective, indent=2, default=str))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    configure_logging(settings.log)
    from .verify import verify_cache

    report = trio.run(partial(verify_cache, settings, drop=not args.keep))
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_purge(args: argparse.Namespace) -> int:
    import os

    from .admin import ADMIN_TOKEN_ENV, purge_remote
    from .errors import ProxyChainError

    token = args.token or os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        print(f"proxychain: purge needs --token or {ADMIN_TOKEN_ENV}", file=sys.stderr)
        return EXIT_USAGE
    target: str = args.target
    # A trailing "*" reads as "everything under", the way people write it in a shell.
    is_prefix = args.prefix or target.endswith("*")
    target = target.removesuffix("*") if is_prefix else target
    try:
        purged = trio.run(
            partial(
                purge_remote,
                args.admin,
                token,
                url=None if is_prefix else target,
                prefix=target if is_prefix else None,
            )
        )
    except ProxyChainError as exc:
        print(f"proxychain: purge failed: {exc.reason}", file=sys.stderr)
        return 1
    print(f"purged {purged} {'entry' if purged == 1 else 'entries'}")
    return 0


def _cmd_warm(args: argparse.Namespace) -> int:
    from .lockfiles import LockfileError
    from .warm import DEFAULT_CONCURRENCY, prefixes_from_settings, warm_main

    settings = _load(args.config)
    proxy = args.proxy or f"http://{settings.server.host}:{settings.server.port}"
    try:
        return warm_main(
            args.lockfiles,
            proxy=proxy,
            prefixes=prefixes_from_settings(settings),
            concurrency=args.concurrency or DEFAULT_CONCURRENCY,
            progress=False if args.no_progress else None,
        )
    except LockfileError as exc:
        print(f"proxychain: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _replace(obj: object, **changes: object) -> object:
    import dataclasses

    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def build_parser() -> argparse.ArgumentParser:
    """The ``proxychain`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="proxychain",
        description="A streaming two-tier caching reverse proxy for package mirrors.",
    )
    parser.add_argument("--version", action="version", version=f"proxychain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="run the proxy in the foreground")
    serve_p.add_argument("--config", "-c", help="TOML config file (default: built-in config)")
    serve_p.add_argument("--listen", help="override [server] listen, e.g. 127.0.0.1:8080")
    serve_p.add_argument("--cache-dir", help="override [cache] dir")
    serve_p.add_argument("--workers", type=int, help="worker processes sharing the port")
    serve_p.set_defaults(func=_cmd_serve)

    check_p = sub.add_parser("check-config", help="validate a config and print the settings")
    check_p.add_argument("path")
    check_p.set_defaults(func=_cmd_check_config)

    verify_p = sub.add_parser("verify", help="check every disk entry against its digest")
    verify_p.add_argument("--config", "-c")
    verify_p.add_argument("--keep", action="store_true", help="report corrupt entries only")
    verify_p.set_defaults(func=_cmd_verify)

    warm_p = sub.add_parser("warm", help="fetch what lockfiles pin through a running proxy")
    warm_p.add_argument("lockfiles", nargs="+", metavar="LOCKFILE")
    warm_p.add_argument("--config", "-c", help="the proxy's config (route prefixes, listen)")
    warm_p.add_argument("--proxy", help="the proxy's base URL (default: from the config)")
    warm_p.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    warm_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    warm_p.set_defaults(func=_cmd_warm)

    from .settings import DEFAULT_ADMIN_LISTEN

    purge_p = sub.add_parser(
        "purge", help="remove a URL (every variant) or a prefix from a running proxy's cache"
    )
    purge_p.add_argument("target", help="a URL or path; a trailing * purges everything under it")
    purge_p.add_argument("--prefix", action="store_true", help="treat TARGET as a prefix")
    purge_p.add_argument(
        "--admin",
        default=f"http://{DEFAULT_ADMIN_LISTEN}",
        help=f"the admin plane's base URL (default: http://{DEFAULT_ADMIN_LISTEN})",
    )
    purge_p.add_argument("--token", help="admin bearer token (default: $PROXYCHAIN_ADMIN_TOKEN)")
    purge_p.set_defaults(func=_cmd_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``proxychain`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"proxychain: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
