"""The shell side of the package protocols: body rewriting and integrity checks at fill time.

Theory of operation
-------------------

Most fills stream: each chunk goes to the client and into the store writer at once. A few path
classes of the mirror kinds cannot, because their bytes must be checked or changed before any
client sees them:

* **Rewrites**: PyPI index pages (HTML and JSON) and npm packuments link to files on the
  upstream; the links are pointed back through the proxy (``pypi.rewrite_index``,
  ``npm.rewrite_packument``). The body is decoded from ``Content-Encoding`` first, and the new
  body gets its own ``Content-Length`` and ``ETag``.
* **Verifications**: a PyPI file whose ``sha256`` an index page announced, an npm tarball whose
  ``dist.integrity`` a packument announced, a Go ``.mod``/``.zip`` whose ``h1:`` hash a checksum
  database lookup (passing through the same route) announced.
* **Learning**: a checksum database ``lookup`` answer is stored as is, and the hashes it carries
  are learned for the module version's ``.mod`` and ``.zip``.

The proxy asks :func:`plan_fill` once the upstream's head is known. ``None`` means stream as
usual. Otherwise the proxy fills the whole body into the store writer *without* sending it to
the client, then awaits :func:`finish_fill`. That reads the temp file in a worker thread,
verifies and/or rewrites it, and either commits the entry (returned; serve it from the store)
or aborts the writer and returns an :class:`IntegrityError` (the proxy counts it, tries the
next upstream, and never serves those bytes).

Announced digests live in a :class:`DigestBook`: in memory, bounded, and appended to a small
JSON-lines file under the cache directory so they survive a restart and are shared by worker
processes (a process that misses a digest re-reads what the others appended). Losing a line
(a crash, a compaction racing another process's append) only means one file is stored
unverified, as a plain HTTP cache would; the client still checks its own hashes.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import logging
import os
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, assert_never

import trio

from . import goproxy, mirror, npm, pypi
from .appendlog import append_lines, read_new_lines
from .entry import Entry
from .errors import RequestRefused, UpstreamError
from .http import Headers, ResponseHead
from .policy import UPSTREAM_ETAG_FIELD
from .settings import RouteSettings

__all__ = [
    "DIGEST_FILE_NAME",
    "HASH_ALGORITHMS",
    "DigestBook",
    "FillPlan",
    "IntegrityError",
    "check_file_digest",
    "finish_fill",
    "open_digest_book",
    "plan_fill",
    "proxy_base_for",
    "rewrites",
    "rewritten_conditionals",
    "rewritten_not_modified",
    "upstream_target",
]

log = logging.getLogger("proxychain.packages")

DIGEST_FILE_NAME = "package-digests.jsonl"
# Digests kept in memory; beyond this the oldest learned are forgotten (a forgotten digest
# means the file is stored unverified). ~250 bytes each: about 125 MiB at the cap.
MAX_DIGESTS = 500_000
# Rewrite the digest file once it holds this many times more lines than live digests.
COMPACT_FACTOR = 2
COMPACT_MIN_LINES = 10_000
# Largest metadata body rewritten in memory (the biggest npm packuments are ~100 MiB).
MAX_REWRITE_BYTES = 256 * 1024 * 1024
# A checksum-database lookup answer is a few hundred bytes; refuse to parse megabytes.
MAX_SUMDB_LOOKUP_BYTES = 64 * 1024
WRITE_CHUNK_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024
# Every algorithm an announced digest may use (mirror.DIGEST_ALGORITHMS plus SRI's sha384).
HASH_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")
# Response fields that describe the upstream's bytes, not a rewritten body.
_REPRESENTATION_FIELDS = ("content-encoding", "content-length", "content-md5", "digest", "etag")
# A rewritten body's strong ETag: this prefix, then 40 hex digits of its sha256.
REWRITTEN_ETAG_PREFIX = '"pc-'


FillAction = Literal["rewrite-pypi", "rewrite-npm", "verify", "learn-sumdb"]


class IntegrityError(UpstreamError):
    """An upstream's body failed its announced digest, or could not be checked or rewritten.

    The entry is dropped, never served; the proxy tries the next upstream.
    """

    status_hint = 502

    def __init__(self, message: str, *, upstream: str = "", url: str = "") -> None:
        super().__init__(message, upstream=upstream)
        self.url = url


# ---- the digest book -------------------------------------------------------------------------


class DigestBook:
    """Digests announced for route-relative paths, per route prefix; see the module docstring.

    Build it with :func:`open_digest_book`; ``path=None`` keeps it in memory only.
    """

    def __init__(self, path: Path | None, *, max_digests: int = MAX_DIGESTS) -> None:
        self.path = path
        self.max_digests = max_digests
        self._digests: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._offset = 0  # bytes of the file already read
        self._lines = 0  # lines in the file, for compaction
        self._lock = trio.Lock()

    def __len__(self) -> int:
        return len(self._digests)

    def get(self, prefix: str, path: str) -> str | None:
        """The digest known in this process for ``path`` of the route at ``prefix``."""
        return self._digests.get((prefix, path))

    async def expected(self, prefix: str, path: str) -> str | None:
        """The digest for ``path``, re-reading what other processes appended when unknown."""
        found = self.get(prefix, path)
        if found is None and self.path is not None:
            await self.refresh()
            found = self.get(prefix, path)
        return found

    def _put(self, prefix: str, path: str, digest: str) -> bool:
        ikey = (prefix, path)
        if self._digests.get(ikey) == digest:
            self._digests.move_to_end(ikey)
            return False
        self._digests[ikey] = digest
        self._digests.move_to_end(ikey)
        while len(self._digests) > self.max_digests:
            self._digests.popitem(last=False)
        return True

    async def learn(self, prefix: str, digests: Mapping[str, str]) -> int:
        """Record ``digests`` (route-relative path -> digest); returns how many were new."""
        fresh = {p: d for p, d in digests.items() if "?" not in p and self._put(prefix, p, d)}
        if fresh and self.path is not None:
            lines = "".join(
                json.dumps({"r": prefix, "p": p, "d": d}, separators=(",", ":")) + "\n"
                for p, d in fresh.items()
            ).encode()
            async with self._lock:
                await trio.to_thread.run_sync(append_lines, self.path, lines)
                self._lines += len(fresh)
                if self._lines > max(COMPACT_MIN_LINES, COMPACT_FACTOR * len(self._digests)):
                    await self._compact()
        return len(fresh)

    async def refresh(self) -> None:
        """Read lines appended to the file since the last read (by any process)."""
        if self.path is None:
            return
        async with self._lock:
            data, self._offset = await trio.to_thread.run_sync(
                read_new_lines, self.path, self._offset
            )
            self._absorb(data)

    def _absorb(self, data: bytes) -> None:
        for line in data.splitlines():
            try:
                doc = json.loads(line)
                prefix, path, digest = doc["r"], doc["p"], doc["d"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: skip it
            if isinstance(prefix, str) and isinstance(path, str) and isinstance(digest, str):
                self._put(prefix, path, digest)
                self._lines += 1

    async def _compact(self) -> None:
        assert self.path is not None
        snapshot = b"".join(
            json.dumps({"r": r, "p": p, "d": d}, separators=(",", ":")).encode() + b"\n"
            for (r, p), d in self._digests.items()
        )
        self._offset = await trio.to_thread.run_sync(_replace_file, self.path, snapshot)
        self._lines = len(self._digests)


def _replace_file(path: Path, data: bytes) -> int:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


async def open_digest_book(cache_dir: Path | None) -> DigestBook:
    """The digest book persisted under ``cache_dir`` (loaded now), or in memory for None."""
    if cache_dir is None:
        return DigestBook(None)
    await trio.to_thread.run_sync(lambda: cache_dir.mkdir(parents=True, exist_ok=True))
    book = DigestBook(cache_dir / DIGEST_FILE_NAME)
    await book.refresh()
    return book


# ---- planning --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FillPlan:
    """What :func:`finish_fill` must do with one buffered fill.

    Attributes:
        action: ``"rewrite-pypi"``, ``"rewrite-npm"``, ``"verify"`` or ``"learn-sumdb"``.
        route_prefix: the route's prefix (``/pypi/``), the digest book's namespace.
        key_path: the route-relative canonical path that was fetched.
        upstream_base: base URL of the upstream that answered (links under it are rewritten).
        proxy_base: what rewritten links start with: ``http://host:port/npm`` for npm (npm
            needs absolute tarball URLs); the route prefix without its slash for PyPI.
        file_hosts: the PyPI route's file hosts.
        content_type: the upstream's ``Content-Type``.
        expected: the announced digest, for ``"verify"``.
    """

    action: FillAction
    route_prefix: str
    key_path: str
    upstream_base: str = ""
    proxy_base: str = ""
    file_hosts: tuple[str, ...] = ()
    content_type: str = ""
    expected: str | None = None


_REWRITE_KINDS: dict[tuple[str, str], FillAction] = {
    ("pypi", "simple-index"): "rewrite-pypi",
    ("pypi", "project-page"): "rewrite-pypi",
    ("npm", "packument"): "rewrite-npm",
}
_VERIFY_KINDS = frozenset(
    {("pypi", "file"), ("npm", "tarball"), ("goproxy", "mod"), ("goproxy", "zip")}
)


async def plan_fill(
    route: RouteSettings,
    path_class: mirror.PathClass,
    head: ResponseHead,
    *,
    upstream: str,
    proxy_base: str,
    book: DigestBook,
) -> FillPlan | None:
    """Decide whether a fill must be buffered and finished by :func:`finish_fill`.

    Args:
        route: the route's settings (kind, prefix, file hosts).
        path_class: the request path's class (``mirror.classify``).
        head: the upstream's response head; only 200 answers are planned.
        upstream: base URL of the upstream that answered (a chain URL or a file host).
        proxy_base: the route's public base URL (see :func:`proxy_base_for`).
        book: announced digests.

    Returns:
        ``None`` to stream the fill as usual, else the plan.
    """
    if head.status != 200:
        return None
    kind = (route.kind, path_class.kind)
    prefix, key_path = route.prefix, path_class.key_path
    action = _REWRITE_KINDS.get(kind)
    if action is not None:
        return FillPlan(
            action=action,
            route_prefix=prefix,
            key_path=key_path,
            upstream_base=upstream,
            proxy_base=proxy_base if action == "rewrite-npm" else prefix.rstrip("/"),
            file_hosts=route.file_hosts,
            content_type=head.headers.get("content-type") or "",
        )
    if kind == ("goproxy", "sumdb-lookup"):
        return FillPlan(action="learn-sumdb", route_prefix=prefix, key_path=key_path)
    if kind in _VERIFY_KINDS:
        expected = path_class.expected_digest or await book.expected(prefix, key_path)
        if expected is not None:
            return FillPlan(
                action="verify", route_prefix=prefix, key_path=key_path, expected=expected
            )
    return None


def rewrites(route_kind: str, path_kind: str) -> bool:
    """Whether 200 answers for this path class are rewritten (decoded, links pointed back).

    The proxy asks such upstreams for ``Accept-Encoding: gzip`` only, whatever the client
    accepts: :func:`decode_content` undoes gzip and deflate, not brotli or zstd.
    """
    return (route_kind, path_kind) in _REWRITE_KINDS


def rewritten_conditionals(stored: Headers, conditional: Headers) -> Headers:
    """The validators to send upstream for a stored entry, which may be a rewritten body.

    A rewritten body's ETag is ours; the upstream only knows its own, kept in
    ``x-upstream-etag`` (absent when the upstream sent none: then only the date validates).
    """
    if not _is_rewritten(stored):
        return conditional
    upstream_etag = stored.get(UPSTREAM_ETAG_FIELD)
    if upstream_etag:
        return conditional.set("if-none-match", upstream_etag)
    return conditional.remove("if-none-match")


def rewritten_not_modified(stored: Headers, head: ResponseHead) -> ResponseHead:
    """A 304 for a rewritten entry, in the terms of the stored body (RFC 9111 §4.3.4).

    The upstream's ETag is mapped back to ours (so the 304 selects the entry, and our ETag is
    kept), and the fields describing the upstream's bytes are dropped.
    """
    if head.status != 304 or not _is_rewritten(stored):
        return head
    headers = head.headers.remove(*_REPRESENTATION_FIELDS)
    etag, ours = head.headers.get("etag"), stored.get("etag")
    if ours and (etag is None or etag == stored.get(UPSTREAM_ETAG_FIELD)):
        headers = headers.set("etag", ours)
    elif etag is not None:
        headers = headers.set("etag", etag)  # another representation: selects nothing
    return ResponseHead(status=304, reason=head.reason, headers=headers)


def _is_rewritten(stored: Headers) -> bool:
    etag = stored.get("etag") or ""
    return stored.get(UPSTREAM_ETAG_FIELD) is not None or etag.startswith(REWRITTEN_ETAG_PREFIX)


def proxy_base_for(prefix: str, *, host: str | None, scheme: str = "http") -> str:
    """The public base URL of a route as a client reached it (``http://host:port/npm``).

    ``host`` is the client's ``Host`` field; without one the result is root-relative.
    """
    base = prefix.rstrip("/")
    return f"{scheme}://{host}{base}" if host else base


def upstream_target(route: RouteSettings, key_path: str) -> tuple[str | None, str]:
    """Where a route-relative path is fetched: ``(file host base URL, path)`` for PyPI's
    ``/files/<host>/...`` paths whose host is one of the route's ``file_hosts``, else
    ``(None, key_path)``: the route's own chain.

    A ``/files/`` path naming another host goes to the chain unchanged: when the upstream is
    another proxychain, it is that node's rewritten file link (a chained cache), and any other
    upstream answers 404. Only configured hosts are contacted directly (never an open relay).

    Raises:
        MalformedPath: a ``/files/`` path without host or file part.
    """
    if route.kind != "pypi":
        return None, key_path
    try:
        return pypi.map_file_path(key_path, file_hosts=route.file_hosts)
    except mirror.MalformedPath:
        raise
    except RequestRefused:
        return None, key_path


# ---- finishing -------------------------------------------------------------------------------


class FillWriter(Protocol):
    """The store writer a buffered fill went into (``store.StoreWriter``)."""

    @property
    def tmp_path(self) -> Path: ...

    @property
    def bytes_written(self) -> int: ...

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self, entry: Entry, *, expected_size: int | None = None) -> Entry: ...

    async def abort(self) -> None: ...


class WriterFactory(Protocol):
    """Opens store writers (``store.Store``)."""

    async def open_writer(self, key: str, variant: str) -> FillWriter: ...


async def finish_fill(
    plan: FillPlan,
    writer: FillWriter,
    entry: Entry,
    *,
    store: WriterFactory,
    book: DigestBook,
    expected_size: int | None = None,
    upstream: str = "",
) -> Entry | IntegrityError:
    """Verify and/or rewrite a buffered fill, then commit it or drop it.

    Args:
        plan: from :func:`plan_fill`.
        writer: holds the whole upstream body, not yet committed.
        entry: the entry the proxy would commit (head, vary, times).
        store: opens the writer for a rewritten body.
        book: learns the digests a rewritten page or a sumdb lookup announces.
        expected_size: the upstream's ``Content-Length``, when it sent one.
        upstream: the upstream's URL, for the error.

    Returns:
        The committed entry (serve it from the store), or an :class:`IntegrityError` when
        the body must not be served (the writer is aborted).
    """
    url = entry.url or plan.key_path
    try:
        if expected_size is not None and writer.bytes_written != expected_size:
            raise IntegrityError(
                f"body is {writer.bytes_written} bytes, upstream promised {expected_size}"
            )
        match plan.action:
            case "verify":
                assert plan.expected is not None
                ok = await trio.to_thread.run_sync(
                    check_file_digest, plan.expected, writer.tmp_path, plan.key_path
                )
                if not ok:
                    raise IntegrityError(f"body does not match the announced {plan.expected}")
                return await writer.commit(entry.replace(verified=plan.expected))
            case "learn-sumdb":
                data = await _read_body(writer, MAX_SUMDB_LOOKUP_BYTES)
                await book.learn(plan.route_prefix, sumdb_lookup_digests(data))
                return await writer.commit(entry)
            case "rewrite-pypi" | "rewrite-npm":
                return await _rewrite(plan, writer, entry, store=store, book=book)
            case _:
                assert_never(plan.action)
    except IntegrityError as exc:
        with trio.CancelScope(shield=True):
            await writer.abort()
        exc.upstream = exc.upstream or upstream
        exc.url = url
        log.warning("%s from %s: %s", url, exc.upstream or "upstream", exc)
        return exc


async def _read_body(writer: FillWriter, limit: int) -> bytes:
    if writer.bytes_written > limit:
        raise IntegrityError(f"body of {writer.bytes_written} bytes exceeds {limit}")
    return await trio.to_thread.run_sync(writer.tmp_path.read_bytes)


async def _rewrite(
    plan: FillPlan, writer: FillWriter, entry: Entry, *, store: WriterFactory, book: DigestBook
) -> Entry:
    raw = await _read_body(writer, MAX_REWRITE_BYTES)
    coding = entry.headers.get("content-encoding") or ""
    result = await trio.to_thread.run_sync(_decode_and_rewrite, plan, raw, coding)
    await book.learn(plan.route_prefix, result.digests)
    if result.body is raw and not coding:
        return await writer.commit(entry)
    headers = _rewritten_headers(entry.headers, result.body)
    await writer.abort()
    new = await store.open_writer(entry.key, entry.variant)
    try:
        view = memoryview(result.body)
        for start in range(0, len(view), WRITE_CHUNK_BYTES):
            await new.write(bytes(view[start : start + WRITE_CHUNK_BYTES]))
        return await new.commit(entry.replace(headers=headers), expected_size=len(result.body))
    except BaseException:
        with trio.CancelScope(shield=True):
            await new.abort()
        raise


def _decode_and_rewrite(plan: FillPlan, raw: bytes, coding: str) -> mirror.RewriteResult:
    body = decode_content(raw, coding)
    if plan.action == "rewrite-npm":
        return npm.rewrite_packument(
            body, upstream_base=plan.upstream_base, proxy_base=plan.proxy_base
        )
    return pypi.rewrite_index(
        body,
        plan.content_type,
        page_url_path=plan.key_path,
        upstream_base=plan.upstream_base,
        file_hosts=plan.file_hosts,
        proxy_prefix=plan.proxy_base,
    )


def decode_content(data: bytes, coding: str) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, identity; several in order).

    Raises:
        IntegrityError: an unknown coding, or a corrupt encoded body.
    """
    codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
    for name in reversed(codings):
        try:
            if name in ("gzip", "x-gzip"):
                data = gzip.decompress(data)
            elif name == "deflate":
                # RFC 9110 §8.4.1.2 says zlib-wrapped; some servers send raw deflate.
                try:
                    data = zlib.decompress(data)
                except zlib.error:
                    data = zlib.decompress(data, -zlib.MAX_WBITS)
            elif name != "identity":
                raise IntegrityError(f"cannot decode Content-Encoding {name!r} to rewrite")
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"corrupt {name} body: {exc}") from exc
    return data


def _rewritten_headers(headers: Headers, body: bytes) -> Headers:
    """Describe ``body`` instead of the upstream's representation; keep its ETag aside."""
    upstream_etag = headers.get("etag")
    out = headers.remove(*_REPRESENTATION_FIELDS)
    if upstream_etag:
        out = out.set(UPSTREAM_ETAG_FIELD, upstream_etag)
    etag = REWRITTEN_ETAG_PREFIX + hashlib.sha256(body).hexdigest()[:40] + '"'
    return out.set("content-length", str(len(body))).set("etag", etag)


def sumdb_lookup_digests(body: bytes) -> dict[str, str]:
    """Route-relative ``.mod``/``.zip`` paths to the ``h1:`` hashes a sumdb lookup names."""
    out: dict[str, str] = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        parsed = goproxy.parse_go_sum_line(line)
        if parsed is None or not parsed.hash.startswith("h1:"):
            continue
        try:
            base = f"/{goproxy.escape(parsed.module)}/@v/{goproxy.escape(parsed.version)}"
        except ValueError:
            continue
        out[base + (".mod" if parsed.is_gomod else ".zip")] = parsed.hash
    return out


# ---- digests of files (worker threads) -------------------------------------------------------


def check_file_digest(expected: str, path: Path | bytes, key_path: str) -> bool:
    """Whether the file at ``path`` (or a body in memory) matches ``expected`` (blocking:
    run it in a thread).

    ``expected`` is ``"<algo>:<hex>"``, an SRI list, or a Go ``h1:`` hash; for ``h1:`` the
    route-relative ``key_path`` says whether the file is a ``go.mod`` or a module zip.

    Raises:
        IntegrityError: ``expected`` is unusable, or the zip is not a valid module zip.
    """
    if expected.startswith("h1:"):
        return hmac.compare_digest(_go_hash(path, key_path), expected)
    hashes = {name: hashlib.new(name) for name in HASH_ALGORITHMS}
    with _open(path) as file:
        while chunk := file.read(READ_CHUNK_BYTES):
            for h in hashes.values():
                h.update(chunk)
    try:
        return mirror.verify_digest(expected, {n: h.digest() for n, h in hashes.items()})
    except ValueError as exc:
        raise IntegrityError(str(exc)) from exc


def _open(source: Path | bytes) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")


def _go_hash(source: Path | bytes, key_path: str) -> str:
    req = goproxy.parse(key_path)
    if not isinstance(req, goproxy.ModuleRequest) or req.version is None:
        raise IntegrityError(f"no Go module version in {key_path!r}")
    if req.kind == "mod":
        with _open(source) as file:
            return goproxy.mod_hash(file.read())
    if req.kind != "zip":
        raise IntegrityError(f"no h1: hash applies to {key_path!r}")
    try:
        with _open(source) as file, zipfile.ZipFile(file) as archive:
            digests = []
            for info in archive.infolist():
                h = hashlib.sha256()
                with archive.open(info) as member:
                    while chunk := member.read(READ_CHUNK_BYTES):
                        h.update(chunk)
                digests.append((info.filename, h.hexdigest()))
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise IntegrityError(f"not a valid zip: {exc}") from exc
    prefix = f"{req.module}@{req.version}/"
    if any(not name.startswith(prefix) for name, _ in digests):
        raise IntegrityError(f"zip entry outside {prefix!r}")
    try:
        return goproxy.hash1_from_digests(digests)
    except ValueError as exc:
        raise IntegrityError(str(exc)) from exc
