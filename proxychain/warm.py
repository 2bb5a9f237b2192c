"""``proxychain warm``: fetch everything a lockfile names through a running proxy.

A branch office fills its cache overnight: ``proxychain warm go.sum requirements.txt
package-lock.json`` requests every module version, distribution file and tarball the lockfiles
pin, through the proxy's routes, so the next day's builds hit the cache even with the upstream
gone. :mod:`proxychain.lockfiles` reads the lockfiles into what to fetch; this module fetches
it. Go module files and npm tarballs are fetched as the lockfile lists them. For a Python
requirement the project's index page is read through the route first (with the ``Accept`` pip
sends, so pip's later request hits the same cached variant) and every file whose ``sha256``
the lockfile lists is fetched. A body is checked against the digest the lockfile gives for it
(``h1:``, ``sha256`` or ``integrity``).

Pages and files are fetched ``concurrency`` at a time with the project's own HTTP/1.1 client.
Anything that fails (not 200, a digest mismatch, a link that leaves the proxy) is listed in
the summary and makes the exit status 1.
"""

from __future__ import annotations

import hashlib
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import mirror
from .errors import ProxyChainError
from .http import Headers, Request
from .integrity import HASH_ALGORITHMS, IntegrityError, check_file_digest
from .lockfiles import (
    PIP_ACCEPT_ENCODING,
    LockfileError,
    PyRequirement,
    WarmItem,
    detect_kind,
    parse_go_sum,
    parse_package_lock,
    parse_pylock,
    parse_requirements,
    route_target,
    select_files,
)
from .settings import Settings
from .upstream import Origin, Timeouts, UpstreamPool

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Prefixes",
    "WarmReport",
    "prefixes_from_settings",
    "warm",
    "warm_main",
]

DEFAULT_CONCURRENCY = 8
# Generous: a cold fill of a large wheel through a slow upstream takes a while.
FIRST_BYTE_TIMEOUT_SECONDS = 120.0
BETWEEN_BYTES_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0
# Exactly what pip (23.x) sends: Accept is part of the cache key.
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)
# Bodies kept whole only for Go h1: hashes (module zips are at most 500 MiB by go's rules).
READ_LIMIT_H1 = 500 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Prefixes:
    """The route prefixes of the Go, PyPI and npm routes on the proxy."""

    go: str = "/go/"
    pypi: str = "/pypi/"
    npm: str = "/npm/"


def prefixes_from_settings(settings: Settings) -> Prefixes:
    """The first route of each kind in ``settings``; the defaults where a kind is missing."""
    found: dict[str, str] = {}
    for route in settings.routes:
        found.setdefault(route.kind, route.prefix)
    d = Prefixes()
    return Prefixes(
        go=found.get("goproxy", d.go), pypi=found.get("pypi", d.pypi), npm=found.get("npm", d.npm)
    )


@dataclass(slots=True)
class WarmReport:
    """What a warm run did."""

    fetched: int = 0
    bytes: int = 0
    hits: int = 0  # answered from the cache already (X-Cache: HIT)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"warmed {self.fetched} files ({self.bytes} bytes, {self.hits} already cached), "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  failed: {what}: {why}" for what, why in self.failed]
        return "\n".join(lines)


class Progress:
    """Progress output: a bar (rich) on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        if enabled:
            from rich.progress import Progress as RichProgressBar

            self._bar = RichProgressBar()
            self._task = self._bar.add_task("warming", total=0)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, count: int) -> None:
        if self._bar is not None and self._task is not None:
            total = self._bar.tasks[0].total or 0
            self._bar.update(self._task, total=total + count)

    def advance(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Fetched:
    status: int
    body: bytes  # kept only when asked for
    size: int
    hit: bool
    hashes: dict[str, bytes]
    content_type: str


class _Client:
    def __init__(self, proxy: str, concurrency: int) -> None:
        self.origin = Origin.parse(proxy)
        self.base = proxy.rstrip("/")
        self.pool = UpstreamPool(
            self.origin,
            timeouts=Timeouts(
                connect=CONNECT_TIMEOUT_SECONDS,
                first_byte=FIRST_BYTE_TIMEOUT_SECONDS,
                between_bytes=BETWEEN_BYTES_TIMEOUT_SECONDS,
            ),
            max_idle=concurrency,
        )
        self.limiter = trio.CapacityLimiter(concurrency)

    async def get(
        self, target: str, *, accept: str = "", accept_encoding: str = "", keep: bool = False
    ) -> _Fetched:
        """GET ``target``; the body is decoded from gzip/deflate before it is hashed."""
        fields = [("accept", accept), ("accept-encoding", accept_encoding)]
        headers = Headers([(name, value) for name, value in fields if value])
        hashes = {name: hashlib.new(name) for name in HASH_ALGORITHMS}
        chunks: list[bytes] = []
        size = 0
        request = Request(method="GET", target=target, headers=headers)
        async with self.limiter, self.pool.request(request) as response:
            head = response.head
            decoder = _decoder(head.headers.get("content-encoding") or "")
            async for raw in response.body():
                chunk = decoder.decompress(raw) if decoder is not None else bytes(raw)
                size += len(raw)
                for h in hashes.values():
                    h.update(chunk)
                if keep:
                    if size > READ_LIMIT_H1:
                        raise IntegrityError(f"body larger than {READ_LIMIT_H1} bytes")
                    chunks.append(chunk)
            if decoder is not None:
                tail = decoder.flush()
                for h in hashes.values():
                    h.update(tail)
                chunks.append(tail)
        return _Fetched(
            status=head.status,
            body=b"".join(chunks),
            size=size,
            hit=(head.headers.get("x-cache") or "").upper() == "HIT",
            hashes={n: h.digest() for n, h in hashes.items()},
            content_type=head.headers.get("content-type") or "",
        )


def _decoder(coding: str) -> zlib._Decompress | None:
    """A streaming decoder for gzip or zlib-wrapped deflate; None for identity.

    Raises:
        IntegrityError: a coding it cannot decode.
    """
    name = coding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip", "deflate"):
        # 32 + MAX_WBITS: detect a gzip or zlib header by itself.
        return zlib.decompressobj(32 + zlib.MAX_WBITS)
    raise IntegrityError(f"cannot decode Content-Encoding {coding!r}")


async def _fetch_item(client: _Client, item: WarmItem, report: WarmReport) -> None:
    h1 = item.expected is not None and item.expected.startswith("h1:")
    try:
        got = await client.get(
            item.target, accept=item.accept, accept_encoding=item.accept_encoding, keep=h1
        )
        if got.status != 200:
            raise IntegrityError(f"answered {got.status}")
        if item.expected is not None:
            if h1:
                ok = await trio.to_thread.run_sync(
                    check_file_digest, item.expected, got.body, item.key_path
                )
            else:
                ok = mirror.verify_digest(item.expected, got.hashes)
            if not ok:
                raise IntegrityError(f"body does not match {item.expected}")
    except (ProxyChainError, ValueError, zlib.error) as exc:
        report.failed.append((item.target, str(exc)))
        return
    report.fetched += 1
    report.bytes += got.size
    report.hits += got.hit


async def _resolve_python(
    client: _Client, requirement: PyRequirement, prefix: str, report: WarmReport
) -> list[WarmItem]:
    page_target = route_target(prefix, f"/simple/{requirement.name}/")
    what = f"{requirement.name}=={requirement.version}"
    try:
        got = await client.get(
            page_target, accept=PIP_ACCEPT, accept_encoding=PIP_ACCEPT_ENCODING, keep=True
        )
        if got.status != 200:
            raise IntegrityError(f"index page answered {got.status}")
        files = select_files(got.body, got.content_type, client.base + page_target, requirement)
    except (ProxyChainError, ValueError, KeyError, AttributeError, zlib.error) as exc:
        report.failed.append((what, str(exc)))
        return []
    if not files:
        report.failed.append((what, "no file on the index page matches the locked hashes"))
        return []
    items = []
    for url, digest in files:
        if not url.startswith(client.base + "/"):
            report.failed.append((url, "the index links outside the proxy"))
            continue
        target = url[len(client.base) :]
        items.append(WarmItem(target=target, expected=digest, accept_encoding=PIP_ACCEPT_ENCODING))
    return items


async def warm(
    lockfiles: Sequence[Path],
    *,
    proxy: str,
    prefixes: Prefixes = Prefixes(),  # frozen, so sharing the default is safe
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: bool = False,
) -> WarmReport:
    """Fetch everything ``lockfiles`` pin through the proxy at ``proxy`` (``http://host:port``).

    Raises:
        LockfileError: a lockfile is unreadable or malformed (nothing is fetched).
    """
    items: list[WarmItem] = []
    python: list[PyRequirement] = []
    for path in lockfiles:
        kind = detect_kind(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LockfileError(f"{path}: {exc.strerror or exc}") from None
        if kind == "go":
            items += parse_go_sum(text, prefixes.go)
        elif kind == "npm":
            items += parse_package_lock(text, prefixes.npm)
        elif kind == "pylock":
            python += parse_pylock(text)
        else:
            python += parse_requirements(text)
    report = WarmReport()
    client = _Client(proxy, concurrency)
    with Progress(progress) as bar:

        async def run(item: WarmItem) -> None:
            await _fetch_item(client, item, report)
            bar.advance()

        async def resolve(requirement: PyRequirement, nursery: trio.Nursery) -> None:
            found = await _resolve_python(client, requirement, prefixes.pypi, report)
            bar.add(len(found))
            for item in found:
                nursery.start_soon(run, item)
            bar.advance()

        bar.add(len(items) + len(python))
        try:
            async with trio.open_nursery() as nursery:
                for requirement in python:
                    nursery.start_soon(resolve, requirement, nursery)
                for item in items:
                    nursery.start_soon(run, item)
        finally:
            await client.pool.aclose()
    return report


def warm_main(
    lockfiles: Sequence[str],
    *,
    proxy: str,
    prefixes: Prefixes,
    concurrency: int,
    progress: bool | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Run :func:`warm` and print the summary: exit status 0, or 1 if anything failed."""
    show = sys.stderr.isatty() if progress is None else progress
    report = trio.run(
        lambda: warm(
            [Path(p) for p in lockfiles],
            proxy=proxy,
            prefixes=prefixes,
            concurrency=concurrency,
            progress=show,
        )
    )
    out(report.summary())
    return 0 if report.ok else 1
