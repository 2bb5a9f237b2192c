"""``proxychain warm``: fetch everything a lockfile names through a running proxy.

A branch office fills its cache overnight: ``proxychain warm go.sum requirements.txt
package-lock.json`` requests every module version, distribution file and tarball the lockfiles
pin, through the proxy's routes, so the next day's builds hit the cache even with the upstream
gone. Lockfile kinds, by file name:

* ``go.sum``: each ``<module> <version>/go.mod`` line fetches ``.mod``; each ``<module>
  <version>`` line fetches ``.info`` and ``.zip``. The ``h1:`` hashes are checked.
* ``requirements*.txt`` with ``--hash`` options, and ``pylock*.toml`` (PEP 751): the project's
  index page is read through the route (with the ``Accept`` pip sends, so pip's later request
  hits the same cached variant) and every file whose ``sha256`` the lockfile lists is fetched.
* ``package-lock.json`` / ``npm-shrinkwrap.json``: every ``resolved`` tarball URL, mapped onto
  the npm route (its path below the registry), checked against ``integrity``.

Pages and files are fetched ``concurrency`` at a time with the project's own HTTP/1.1 client.
Anything that fails (not 200, a digest mismatch, a link that leaves the proxy) is listed in
the summary and makes the exit status 1.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio

from . import goproxy, mirror, pypi
from .errors import ProxyChainError
from .http import Headers, Request
from .packages import HASH_ALGORITHMS, IntegrityError, check_file_digest
from .settings import Settings
from .upstream import Origin, Timeouts, UpstreamPool

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

__all__ = [
    "LockfileError",
    "Prefixes",
    "PyRequirement",
    "WarmItem",
    "WarmReport",
    "detect_kind",
    "parse_go_sum",
    "parse_package_lock",
    "parse_pylock",
    "parse_requirements",
    "prefixes_from_settings",
    "warm",
]

DEFAULT_CONCURRENCY = 8
# Generous: a cold fill of a large wheel through a slow upstream takes a while.
FIRST_BYTE_TIMEOUT_SECONDS = 120.0
BETWEEN_BYTES_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0
# Exactly what pip (23.x) and npm (pacote) send: Accept is part of the cache key.
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)
NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
# Accept-Encoding as each client sends it: upstreams often answer "Vary: Accept-Encoding",
# and a variant stored for another value would not serve the client's later request.
GO_ACCEPT_ENCODING = "gzip"  # Go's net/http transport
PIP_ACCEPT_ENCODING = "gzip, deflate"  # pip's vendored urllib3
NPM_ACCEPT_ENCODING = "gzip,deflate"  # npm's minipass-fetch
# Bodies kept whole only for Go h1: hashes (module zips are at most 500 MiB by go's rules).
READ_LIMIT_H1 = 500 * 1024 * 1024

LockKind = Literal["go", "requirements", "pylock", "npm"]


class LockfileError(ProxyChainError):
    """A lockfile could not be read or parsed."""

    status_hint = 400


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


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmItem:
    """One URL to fetch: ``target`` is the origin-form path on the proxy."""

    target: str
    expected: str | None = None  # a digest to check ("sha256:..", SRI, "h1:..")
    key_path: str = ""  # route-relative path, for h1: hashes
    accept: str = ""
    accept_encoding: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PyRequirement:
    """A pinned Python project and the sha256 digests of the files allowed for it."""

    name: str
    version: str
    hashes: frozenset[str]  # "sha256:<hex>"


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


# ---- lockfiles (pure) ------------------------------------------------------------------------


def detect_kind(path: Path) -> LockKind:
    """The lockfile kind from its name.

    Raises:
        LockfileError: the name is not one of the known lockfile names.
    """
    name = path.name.lower()
    if name == "go.sum":
        return "go"
    if name in ("package-lock.json", "npm-shrinkwrap.json"):
        return "npm"
    if re.fullmatch(r"pylock(\.[^.]+)?\.toml", name):
        return "pylock"
    if name.endswith(".txt"):
        return "requirements"
    raise LockfileError(
        f"{path}: unknown lockfile kind (expected go.sum, requirements*.txt, pylock*.toml, "
        "package-lock.json or npm-shrinkwrap.json)"
    )


def _route_target(prefix: str, path: str) -> str:
    return prefix.rstrip("/") + path


def _go_item(prefix: str, path: str, expected: str | None) -> WarmItem:
    return WarmItem(
        target=_route_target(prefix, path),
        expected=expected,
        key_path=path if expected else "",
        accept_encoding=GO_ACCEPT_ENCODING,
    )


def parse_go_sum(text: str, prefix: str) -> list[WarmItem]:
    """Items for a ``go.sum``: ``.mod`` per go.mod line, ``.info`` and ``.zip`` per zip line."""
    items: list[WarmItem] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parsed = goproxy.parse_go_sum_line(line)
        if parsed is None:
            raise LockfileError(f"go.sum line {number}: expected '<module> <version> <hash>'")
        try:
            base = f"/{goproxy.escape(parsed.module)}/@v/{goproxy.escape(parsed.version)}"
        except ValueError as exc:
            raise LockfileError(f"go.sum line {number}: {exc}") from None
        h1 = parsed.hash if parsed.hash.startswith("h1:") else None
        if parsed.is_gomod:
            items.append(_go_item(prefix, base + ".mod", h1))
        else:
            items += [_go_item(prefix, base + ".info", None), _go_item(prefix, base + ".zip", h1)]
    return items


def _logical_lines(text: str) -> Iterator[str]:
    """Requirement lines with ``\\`` continuations joined and comments removed."""
    buffer = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw)
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            yield buffer.strip()
        buffer = ""
    if buffer.strip():
        yield buffer.strip()


def parse_requirements(text: str) -> list[PyRequirement]:
    """Pinned requirements with hashes (``pip-compile --generate-hashes`` output).

    Raises:
        LockfileError: a requirement is not pinned with ``==`` or has no ``--hash``.
    """
    out: list[PyRequirement] = []
    for line in _logical_lines(text):
        if line.startswith("-"):
            continue  # options such as --index-url or -r: not files to fetch
        spec, *options = line.split()
        hashes = frozenset(
            _normal_hash(opt.split("=", 1)[1]) for opt in options if opt.startswith("--hash=")
        )
        spec = spec.split(";", 1)[0]
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?===?([^\s,;]+)", spec)
        if match is None:
            raise LockfileError(f"requirement {spec!r} is not pinned with ==")
        if not hashes:
            raise LockfileError(f"requirement {spec!r} has no --hash")
        out.append(
            PyRequirement(name=pypi.normalize_name(match[1]), version=match[3], hashes=hashes)
        )
    return out


def _normal_hash(value: str) -> str:
    algo, _, digest = value.partition(":")
    return f"{algo.lower()}:{digest.lower()}"


def parse_pylock(text: str) -> list[PyRequirement]:
    """Packages of a PEP 751 ``pylock.toml`` with the sha256 of their wheels and sdist."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockfileError(f"pylock: {exc}") from None
    out: list[PyRequirement] = []
    for package in doc.get("packages", []):
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        hashes = frozenset(
            f"sha256:{f['hashes']['sha256'].lower()}"
            for f in files
            if isinstance(f.get("hashes"), dict) and "sha256" in f["hashes"]
        )
        if not hashes:
            continue  # a VCS or directory package: nothing an index serves
        out.append(
            PyRequirement(
                name=pypi.normalize_name(package["name"]),
                version=str(package.get("version", "")),
                hashes=hashes,
            )
        )
    return out


def parse_package_lock(text: str, prefix: str) -> list[WarmItem]:
    """Every ``resolved`` tarball of a ``package-lock.json`` (v1, v2 or v3), on the npm route.

    A URL already on the route (``.../npm/x/-/x-1.tgz``) keeps its path below the prefix;
    any other registry URL contributes its whole path.
    """
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise LockfileError(f"package-lock.json: {exc}") from None
    found: dict[str, str | None] = {}
    for meta in _npm_entries(doc):
        resolved = meta.get("resolved")
        if not isinstance(resolved, str) or not resolved.startswith(("http://", "https://")):
            continue  # links, git and file dependencies
        path = urllib.parse.urlsplit(resolved).path
        marker = "/" + prefix.strip("/") + "/"
        if marker != "//" and marker in path:
            path = "/" + path.split(marker, 1)[1]
        integrity = meta.get("integrity")
        found[path] = integrity if isinstance(integrity, str) else None
    return [
        WarmItem(
            target=_route_target(prefix, path),
            expected=integrity,
            key_path=path,
            accept_encoding=NPM_ACCEPT_ENCODING,
        )
        for path, integrity in found.items()
    ]


def _npm_entries(doc: object) -> Iterator[dict[str, object]]:
    if not isinstance(doc, dict):
        return
    packages = doc.get("packages")
    if isinstance(packages, dict):
        for name, meta in packages.items():
            if name and isinstance(meta, dict):
                yield meta
        return
    stack = [doc.get("dependencies")]  # lockfile v1
    while stack:
        deps = stack.pop()
        if isinstance(deps, dict):
            for meta in deps.values():
                if isinstance(meta, dict):
                    yield meta
                    stack.append(meta.get("dependencies"))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def select_files(
    page: bytes, content_type: str, page_url: str, requirement: PyRequirement
) -> list[tuple[str, str]]:
    """``(absolute URL without fragment, "sha256:<hex>")`` of the page's files the
    requirement's hashes allow (PEP 691 JSON or PEP 503 HTML)."""
    links: list[tuple[str, str | None]] = []
    if "json" in content_type:
        doc = json.loads(page)
        for item in doc.get("files", []):
            sha = item.get("hashes", {}).get("sha256")
            links.append((item["url"], f"sha256:{sha.lower()}" if sha else None))
    else:
        parser = _Links()
        parser.feed(page.decode("utf-8", errors="replace"))
        for href in parser.hrefs:
            algo, _, value = urllib.parse.urlsplit(href).fragment.partition("=")
            links.append((href, f"{algo.lower()}:{value.lower()}" if value else None))
    out = []
    for href, digest in links:
        if digest in requirement.hashes:
            url = urllib.parse.urljoin(page_url, href).split("#", 1)[0]
            out.append((url, digest))
    return out


# ---- fetching (shell) ------------------------------------------------------------------------


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
    page_target = _route_target(prefix, f"/simple/{requirement.name}/")
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
