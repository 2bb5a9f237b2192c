"""The disk tier: stored responses as files, shared safely by several processes.

Theory of operation
-------------------

Layout under ``root``::

    objects/<key[:2]>/<key>/<v>.meta            metadata (JSON, see diskmeta.py)
    objects/<key[:2]>/<key>/<v>.<sha256>.body   the body, named by its own digest
    tmp/<pid>-<token>-<n>.part                  bodies and metadata being written

where ``<v>`` is the variant key, or ``_`` for the empty variant. Keys and variants are hex
digests from ``keys.py`` and are validated as lower-case hex before they touch a path, so no
part of a request ever names a file. A body is published before the metadata that names it,
so several processes may fill, read and evict the same tier (``diskfiles.py`` tells why).

This module is the tier's trio shell, :class:`DiskTier`. The pieces it puts together:
``diskmeta.py`` (the metadata format), ``diskfiles.py`` and ``diskscan.py`` (the blocking
file calls), ``diskindex.py`` (the LRU index) and ``diskwriter.py`` (a body being written).

*No full scan at startup.* ``lookup`` goes straight to the key's directory. Eviction needs an
LRU order of everything on disk; a background task builds it from directory listings and
``stat`` alone (sizes of both files, mtime of the metadata), a few hundred key directories per
worker-thread call, and reads a metadata file only where the listing looks odd (no body or
several for a variant, metadata too short to be valid). It keeps just key, variant, size and
mtime per entry, places what it discovers behind everything this process has used (oldest
metadata mtime first), then enforces the byte budget. Until the scan finishes the budget is
enforced over what is known. A periodic rescan picks up entries other processes committed and
forgets the ones they evicted; each process keeps its own recency.

*Crash leftovers.* On open, temp files of dead processes (or older than a day) are removed.
Unreadable or inconsistent metadata is dropped and logged, never raised out of ``lookup``;
``read`` raises :class:`~proxychain.errors.CacheCorrupt` when a body is missing or short, and
drops the entry.

Every blocking file call runs in a worker thread (``trio.to_thread.run_sync``) under a
``trio.CapacityLimiter``, never on the event loop.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import trio

from .diskfiles import (
    DEFAULT_CHUNK_BYTES,
    _body_name,
    _create,
    _discard,
    _drop_if_same,
    _fs_now,
    _hash_file,
    _load,
    _open_body,
    _prepare,
    _remove_files,
    _replace_meta,
    _vname,
)
from .diskindex import DiskIndex, IndexKey
from .diskmeta import _SHA, META_VERSION, check_key, decode_meta, encode_meta
from .diskscan import (
    Found,
    Problem,
    _list_key_dirs,
    _list_prefixes,
    _read_key_dir,
    _read_key_dir_loaded,
    _scan_prefix,
    _stat_key_dirs,
)
from .diskwriter import CLEANUP_TIMEOUT_SECONDS, DiskWriter
from .entry import Entry
from .errors import CacheCorrupt

__all__ = [
    "DEFAULT_DISK_THREADS",
    "DEFAULT_RESCAN_INTERVAL",
    "META_VERSION",
    "DiskStatistics",
    "DiskTier",
    "DiskWriter",
    "check_key",
    "decode_meta",
    "encode_meta",
    "open_disk_tier",
]

logger = logging.getLogger("proxychain.disk")

# Concurrent file operations; fsync-heavy commits should not starve reads of trio's default 40.
DEFAULT_DISK_THREADS = 16
DEFAULT_RESCAN_INTERVAL = 300.0  # seconds between index rescans (other processes' changes)
SCAN_BATCH_KEYS = 256  # key directories per worker-thread call of the index scan
# A commit renames the body, then the metadata, microseconds apart; an unreferenced body older
# than this (filesystem seconds) is an orphan left by a crash or a lost race.
ORPHAN_GRACE_SECONDS = 60.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LoadedLookup:
    """What :meth:`DiskTier.lookup_loaded` found: the entries, newest response first, and
    their bodies in the same order when they were small enough to read (else ``None``)."""

    entries: list[Entry]
    bodies: list[bytes] | None
    dropped: int  # entries whose body failed its check (dropped and logged by the tier)


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskStatistics:
    """A snapshot of the disk tier, as this process knows it."""

    bytes: int  # bodies plus metadata of indexed entries
    entries: int
    max_bytes: int
    evictions: int
    index_ready: bool  # the background scan has covered the whole tier at least once
    corrupt_dropped: int
    open_writers: int


class DiskTier:
    """Entries on disk under ``root``, evicted least-recently-used beyond ``max_bytes``.

    Build it with :func:`open_disk_tier`, which owns the background index scan.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        limiter: trio.CapacityLimiter,
        exclusive: bool = False,
        create_ahead: bool = False,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.root = root
        self.max_bytes = max_bytes
        # This process is the tier's only writer (no sibling workers): once the index covers
        # the whole tier, a key it does not hold is not on disk, and a miss is told without a
        # worker-thread call (about 1 ms of wake-ups on an idle machine). Were it wrong (a
        # second server on the same directory), the price is one more upstream fetch.
        self._exclusive = exclusive
        # The next writer's temp file, created ahead of time (see open_writer), when
        # ``create_ahead``; ``_nursery`` (set by open_disk_tier) runs its creation.
        self._create_ahead = create_ahead
        self._spare: tuple[Path, BinaryIO, int] | None = None
        self._making_spare = False
        self._nursery: trio.Nursery | None = None
        self._objects = root / "objects"
        self._tmp = root / "tmp"
        self._limiter = limiter
        self._token = secrets.token_hex(4)
        self._names = itertools.count()
        self._index = DiskIndex()
        self._evictions = 0
        self._corrupt = 0
        self._ready = trio.Event()
        self._writers: set[DiskWriter] = set()

    def __repr__(self) -> str:
        return (
            f"<DiskTier {str(self.root)!r} {self._index.bytes}/{self.max_bytes} bytes, "
            f"{len(self._index)} entries, index_ready={self._ready.is_set()}>"
        )

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _key_dir(self, key: str) -> Path:
        return self._objects / key[:2] / key

    def _body_path(self, entry: Entry) -> Path:
        check_key(entry.key, entry.variant)
        if not _SHA.fullmatch(entry.sha256):
            raise ValueError(f"sha256 must be a lower-case hex digest, got {entry.sha256!r}")
        return self._key_dir(entry.key) / _body_name(entry.variant, entry.sha256)

    def _tmp_path(self, suffix: str) -> Path:
        return self._tmp / f"{os.getpid()}-{self._token}-{next(self._names)}.{suffix}"

    # -- drops and evictions --

    def _note_problems(self, problems: list[Problem]) -> None:
        for path, reason in problems:
            self._corrupt += 1
            logger.warning("dropped corrupt cache entry %s: %s", path, reason)

    async def _drop(self, entry: Entry, reason: str) -> None:
        if await self._run(_drop_if_same, self._key_dir(entry.key), entry):
            self._index.drop((entry.key, entry.variant))
            meta = self._key_dir(entry.key) / f"{_vname(entry.variant)}.meta"
            self._note_problems([(meta, reason)])

    async def _enforce_budget(self) -> None:
        while self._index.bytes > self.max_bytes and self._index:
            key, variant = self._index.oldest()
            self._index.drop((key, variant))
            self._evictions += 1
            await self._run(_remove_files, self._key_dir(key), [variant])

    # -- background index --

    async def _scan(self) -> None:
        # What was found, kept compact until the whole tier is seen: the (key, variant) tuples
        # become the index's keys; sizes and metadata mtimes are machine numbers.
        ikeys: list[IndexKey] = []
        sizes = array("q")
        mtimes = array("d")
        with self._index.scanning() as start:
            try:
                cutoff = await self._run(_fs_now, self._tmp) - ORPHAN_GRACE_SECONDS
                for prefix in await self._run(_list_prefixes, self._objects):
                    keys = await self._run(_list_key_dirs, prefix)
                    for i in range(0, len(keys), SCAN_BATCH_KEYS):
                        batch = keys[i : i + SCAN_BATCH_KEYS]
                        more, problems = await self._run(_stat_key_dirs, prefix, batch, cutoff)
                        self._note_problems(problems)
                        for key, variant, size, mtime in more:
                            ikeys.append((key, variant))
                            sizes.append(size)
                            mtimes.append(mtime)
            except OSError:
                logger.exception("disk tier index scan of %s failed", self.root)
                return
            await self._index.merge_scan(start, ikeys, sizes, mtimes)

    async def _index_loop(self, rescan_interval: float | None) -> None:
        while True:
            await self._scan()
            await self._enforce_budget()
            self._ready.set()
            if rescan_interval is None:
                return
            await trio.sleep(rescan_interval)

    async def wait_index_ready(self) -> None:
        """Wait until the background scan has indexed the whole tier once (and the byte
        budget has been enforced over it)."""
        await self._ready.wait()

    # -- the tier interface --

    async def lookup(self, key: str) -> list[Entry]:
        """Every variant stored for ``key``, newest response first.

        Inconsistent or unreadable metadata is dropped and logged, never raised.

        Raises:
            ValueError: ``key`` is not a lower-case hex digest.
        """
        check_key(key)
        if self._known_absent(key):
            return []
        found, problems = await self._run(_read_key_dir, self._key_dir(key), key)
        return [entry for entry, _ in self._found(found, problems, None)]

    async def lookup_loaded(self, key: str, load_max: int) -> LoadedLookup:
        """:meth:`lookup`, and, when every variant's body is at most ``load_max`` bytes, the
        bodies too, checked against their sha256 in the same worker-thread call (for a small
        entry the hop to a thread and back costs more than reading it). A body that fails
        its check is dropped with its entry, as :meth:`load` does.

        Raises:
            ValueError: ``key`` is not a lower-case hex digest.
        """
        check_key(key)
        if self._known_absent(key):
            return LoadedLookup([], None, 0)
        found, problems, bodies = await self._run(
            _read_key_dir_loaded, self._key_dir(key), key, load_max
        )
        pairs = self._found(found, problems, bodies)
        sound = [(entry, body) for entry, body in pairs if not isinstance(body, CacheCorrupt)]
        for entry, body in pairs:
            if isinstance(body, CacheCorrupt):
                await self._drop(entry, str(body))
        loaded = None if bodies is None else [b for _, b in sound if isinstance(b, bytes)]
        return LoadedLookup([entry for entry, _ in sound], loaded, len(pairs) - len(sound))

    def _known_absent(self, key: str) -> bool:
        """True when the index alone says ``key`` has nothing on disk: only a single
        process's tier (``exclusive``) whose index is complete can say so."""
        return self._exclusive and self._ready.is_set() and not self._index.holds_key(key)

    def _found(
        self,
        found: list[Found],
        problems: list[Problem],
        bodies: list[bytes | CacheCorrupt] | None,
    ) -> list[tuple[Entry, bytes | CacheCorrupt | None]]:
        """Index what a key-directory read found, note its problems, and order the entries
        (with their bodies, when read) newest response first."""
        self._note_problems(problems)
        for entry, size, _ in found:
            self._index.put((entry.key, entry.variant), size, recent=False)
        pairs: list[tuple[Entry, bytes | CacheCorrupt | None]] = [
            (entry, None if bodies is None else bodies[i]) for i, (entry, _, _) in enumerate(found)
        ]
        pairs.sort(key=lambda pair: (-pair[0].response_time, pair[0].variant))
        return pairs

    async def read(
        self, entry: Entry, *, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> AsyncGenerator[bytes, None]:
        """Stream ``entry``'s body in chunks of at most ``chunk_size`` bytes.

        Raises:
            CacheCorrupt: the body file is missing, or shorter or longer than recorded (the
                entry is dropped).
        """
        path = self._body_path(entry)
        try:
            file = await self._run(_open_body, path, entry.body_size)
        except CacheCorrupt as exc:
            await self._drop(entry, str(exc))
            raise
        try:
            remaining = entry.body_size
            while remaining:
                chunk = await self._run(file.read, min(chunk_size, remaining))
                if not chunk:
                    await self._drop(entry, "body file shrank while read")
                    raise CacheCorrupt(f"body of {entry.url or entry.key} ended early")
                remaining -= len(chunk)
                yield chunk
        finally:
            file.close()

    async def open_file(self, entry: Entry) -> BinaryIO:
        """``entry``'s body file, opened for reading (close it); its size checked.

        Raises:
            CacheCorrupt: the body file is missing or of the wrong size (the entry is
                dropped).
        """
        try:
            return await self._run(_open_body, self._body_path(entry), entry.body_size)
        except CacheCorrupt as exc:
            await self._drop(entry, str(exc))
            raise

    async def is_body_file(self, entry: Entry, file: BinaryIO) -> bool:
        """Whether ``file`` is ``entry``'s committed body (the same file, not a copy): how a
        body streamed from another process's temp file is known to be the one it stored."""
        path = self._body_path(entry)

        def same() -> bool:
            try:
                mine, theirs = os.fstat(file.fileno()), path.stat()
            except FileNotFoundError:
                return False
            return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)

        return await self._run(same)

    async def drop(self, entry: Entry, reason: str) -> None:
        """Drop ``entry`` found corrupt while it was served (logged and counted)."""
        await self._drop(entry, reason)

    async def load(self, entry: Entry) -> bytes:
        """The whole body, checked against ``entry.sha256`` (for promotion into memory).

        Raises:
            CacheCorrupt: the body is missing, of the wrong size or digest (the entry is
                dropped and counted).
        """
        path = self._body_path(entry)
        try:
            body = await self._run(_load, path, entry.body_size, entry.sha256)
        except CacheCorrupt as exc:
            await self._drop(entry, str(exc))
            raise
        return body

    async def verify(self, entry: Entry) -> bool:
        """Re-hash the body on disk: True when size and sha256 match ``entry``."""
        path = self._body_path(entry)
        try:
            size, digest = await self._run(_hash_file, path)
        except FileNotFoundError:
            return False
        return size == entry.body_size and digest == entry.sha256

    async def open_writer(self, key: str, variant: str, *, batched: bool = False) -> DiskWriter:
        """A temp file for a new body of ``(key, variant)``; commit or abort it.

        ``batched``: gather written chunks (see :meth:`DiskWriter.write`); otherwise every
        accepted byte is in the temp file when ``write`` returns.

        Raises:
            ValueError: ``key`` or ``variant`` is not a hex digest.
        """
        check_key(key, variant)
        spare, self._spare = self._spare, None
        if spare is None:
            path = self._tmp_path("part")
            file, reader = await self._run(_create, path)
        else:
            path, file, reader = spare
        self._make_spare()
        writer = DiskWriter(self, key, variant, path, file, reader, batched=batched)
        self._writers.add(writer)
        return writer

    @property
    def spare_path(self) -> Path | None:
        """The temp file made ahead for the next writer, if there is one now."""
        return self._spare[0] if self._spare is not None else None

    def _make_spare(self) -> None:
        """Create the next writer's temp file in the background: a miss then starts writing
        without a worker-thread call that, one miss after another, waits behind the previous
        miss's commit (fsync and renames in the same directories): about 1 to 2 ms."""
        if self._create_ahead and self._nursery is not None and not self._making_spare:
            self._making_spare = True
            self._nursery.start_soon(self._make_spare_now)

    async def _make_spare_now(self) -> None:
        path = self._tmp_path("part")
        try:
            with trio.CancelScope(shield=True):  # what is created is kept, or discarded on close
                file, reader = await self._run(_create, path)
        except OSError as exc:
            logger.warning("cannot create a temp file under %s ahead of time: %s", self._tmp, exc)
            return  # the next writer creates its own
        finally:
            self._making_spare = False
        if self._spare is not None:  # not expected: one is made only while there is none
            await self._run(_discard, file, reader, path)
            return
        self._spare = (path, file, reader)

    async def _discard_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            path, file, reader = spare
            await self._run(_discard, file, reader, path)

    async def update_meta(self, entry: Entry) -> None:
        """Atomically rewrite the metadata of a stored entry (304 freshening).

        Does nothing when the body ``entry`` names is no longer stored.
        """
        meta = encode_meta(entry)
        tmp = self._tmp_path("meta.part")
        if await self._run(_replace_meta, self._key_dir(entry.key), entry, meta, tmp):
            self._index.put((entry.key, entry.variant), len(meta) + entry.body_size, recent=True)

    async def remove(self, key: str, variant: str | None = None) -> int:
        """Remove one variant of ``key`` (every variant when None); returns entries removed."""
        check_key(key, variant or "")
        removed = await self._run(
            _remove_files, self._key_dir(key), None if variant is None else [variant]
        )
        for gone in removed:
            self._index.drop((key, gone))
        return len(removed)

    async def iter_entries(self) -> AsyncGenerator[Entry, None]:
        """Every stored entry (corrupt metadata is dropped and logged on the way)."""
        for prefix in await self._run(_list_prefixes, self._objects):
            found, problems = await self._run(_scan_prefix, prefix)
            self._note_problems(problems)
            for entry, _, _ in found:
                yield entry

    async def remove_where(self, predicate: Callable[[Entry], bool]) -> int:
        """Remove every entry ``predicate`` accepts (purge); returns entries removed."""
        doomed = [e async for e in self.iter_entries() if predicate(e)]
        total = 0
        for entry in doomed:
            total += await self.remove(entry.key, entry.variant)
        return total

    def touch(self, entry: Entry) -> None:
        """Record a hit on ``entry`` for the LRU order (cheap, no I/O).

        Only entries the index knows move: lookups and commits register what they see, and
        an entry already evicted from disk (still held in memory) must not come back as a
        ghost that counts against the budget.
        """
        self._index.touch((entry.key, entry.variant))

    def statistics(self) -> DiskStatistics:
        """A frozen snapshot of sizes and counters."""
        return DiskStatistics(
            bytes=self._index.bytes,
            entries=len(self._index),
            max_bytes=self.max_bytes,
            evictions=self._evictions,
            index_ready=self._ready.is_set(),
            corrupt_dropped=self._corrupt,
            open_writers=len(self._writers),
        )

    async def _abort_writers(self) -> None:
        for writer in list(self._writers):
            await writer.abort()


@asynccontextmanager
async def open_disk_tier(
    root: Path,
    *,
    max_bytes: int,
    limiter: trio.CapacityLimiter | None = None,
    rescan_interval: float | None = DEFAULT_RESCAN_INTERVAL,
    exclusive: bool = False,
    create_ahead: bool = False,
) -> AsyncIterator[DiskTier]:
    """Open the disk tier at ``root``: create the layout, clean leftover temp files and start
    the background index scan (rescanned every ``rescan_interval`` seconds; None: once).
    ``exclusive``: no other process writes the tier meanwhile (see :class:`DiskTier`).
    ``create_ahead``: keep the next writer's temp file ready (see ``DiskTier._make_spare``).

    On exit the scan is cancelled and writers still open are aborted. Open one tier per
    root per process: opening treats this process's temp files of other tiers as leftovers.
    """
    tier = DiskTier(
        root,
        max_bytes=max_bytes,
        limiter=limiter or trio.CapacityLimiter(DEFAULT_DISK_THREADS),
        exclusive=exclusive,
        create_ahead=create_ahead,
    )
    cleaned = await tier._run(_prepare, root, tier._token)
    if cleaned:
        logger.info("removed %d leftover temp files under %s", cleaned, root / "tmp")
    try:
        async with trio.open_nursery() as nursery:
            tier._nursery = nursery
            nursery.start_soon(tier._index_loop, rescan_interval)
            try:
                yield tier
            finally:
                nursery.cancel_scope.cancel()
                with trio.move_on_after(CLEANUP_TIMEOUT_SECONDS, shield=True):
                    await tier._abort_writers()
    finally:
        tier._nursery = None
        with trio.move_on_after(CLEANUP_TIMEOUT_SECONDS, shield=True):
            await tier._discard_spare()
