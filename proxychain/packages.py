"""The shell side of the package protocols: which fills are buffered, and finishing them.

Theory of operation
-------------------

Most fills stream: each chunk goes to the client and into the store writer at once. A few path
classes of the mirror kinds cannot, because their bytes must be checked or changed before any
client sees them:

* **Rewrites**: PyPI index pages (HTML and JSON) and npm packuments link to files on the
  upstream; the links are pointed back through the proxy (``pypi.rewrite_index``,
  ``npm.rewrite_packument``). The body is decoded from ``Content-Encoding`` first, and the new
  body gets its own ``Content-Length`` and ``ETag`` (``rewriting.py``).
* **Verifications**: a PyPI file whose ``sha256`` an index page announced, an npm tarball whose
  ``dist.integrity`` a packument announced, a Go ``.mod``/``.zip`` whose ``h1:`` hash a checksum
  database lookup (passing through the same route) announced (``integrity.py``).
* **Learning**: a checksum database ``lookup`` answer is stored as is, and the hashes it carries
  are learned for the module version's ``.mod`` and ``.zip``.

The proxy asks :func:`plan_fill` once the upstream's head is known. ``None`` means stream as
usual. Otherwise the proxy fills the whole body into the store writer *without* sending it to
the client, then awaits :func:`finish_fill`. That reads the temp file in a worker thread,
verifies and/or rewrites it, and either commits the entry (returned; serve it from the store)
or aborts the writer and returns an :class:`~proxychain.integrity.IntegrityError` (the proxy
counts it, tries the next upstream, and never serves those bytes).

Announced digests live in a :class:`~proxychain.digestbook.DigestBook` (``digestbook.py``):
bounded, on disk, shared by worker processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, assert_never

import trio

from . import goproxy, mirror, npm, pypi
from .digestbook import DigestBook
from .entry import Entry
from .http import ResponseHead
from .integrity import IntegrityError, check_file_digest
from .rewriting import decode_content, rewritten_headers
from .settings import RouteSettings

__all__ = [
    "FillPlan",
    "finish_fill",
    "plan_fill",
    "rewrites",
]

log = logging.getLogger("proxychain.packages")

# Largest metadata body rewritten in memory (the biggest npm packuments are ~100 MiB).
MAX_REWRITE_BYTES = 256 * 1024 * 1024
# A checksum-database lookup answer is a few hundred bytes; refuse to parse megabytes.
MAX_SUMDB_LOOKUP_BYTES = 64 * 1024
WRITE_CHUNK_BYTES = 1024 * 1024


FillAction = Literal["rewrite-pypi", "rewrite-npm", "verify", "learn-sumdb"]


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
        proxy_base: the route's public base URL (``rewriting.proxy_base_for``).
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
    accepts: :func:`~proxychain.rewriting.decode_content` undoes gzip and deflate, not brotli
    or zstd.
    """
    return (route_kind, path_kind) in _REWRITE_KINDS


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
    headers = rewritten_headers(entry.headers, result.body)
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
