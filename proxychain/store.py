"""The two cache tiers behind one facade: a per-process memory tier over the shared disk tier.

Theory of operation
-------------------

The memory tier is a ``cachetools.LRUCache`` sized in bytes. Its unit is a *primary key with
all its variants* rather than one variant: a lookup must see every variant a key has
(RFC 9111 §4.1 selects among them), so the memory tier holds either all the variants this
process knows of for a key or none, and LRU eviction drops a key's variants together. Bodies
above a per-object cap are never held in memory; they stream from disk.

:class:`Store` keeps that invariant:

* ``lookup`` answers from memory when the key is there, without touching the disk. Otherwise it
  asks the disk tier, and when every variant's body fits the per-object cap it loads them,
  checks each against its recorded sha256 (a mismatch drops the entry from disk and counts it)
  and promotes them together.
* A committed fill goes into memory only when its body fit and every other variant on disk is
  already in memory; otherwise the key leaves memory, and the next lookup promotes from disk.
* Every served hit (``touch``), memory or disk, refreshes the entry's position in the disk
  tier's LRU, so entries that are hot in memory are not evicted from disk underneath.

Memory tiers are per process; several processes share the disk tier. A process's memory may
therefore serve its own copy of an entry another process has since replaced on disk, until
that copy goes stale and is revalidated, which is what RFC 9111 permits of any cache.
A future shared tier slots in beside disk behind the same narrow interface
(lookup / open_writer / commit / remove).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

import trio
from cachetools import Cache, LRUCache

from .disk import DiskStatistics, DiskTier, DiskWriter
from .entry import Entry

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "MemoryStatistics",
    "MemoryTier",
    "Store",
    "StoreStatistics",
    "StoreWriter",
    "Stored",
]

# Charged per variant on top of body and header bytes: the Entry object, its dicts and the
# cache's own bookkeeping come to a few hundred bytes in CPython.
ENTRY_OVERHEAD_BYTES = 512

# Every variant of one key held in memory, as the Stored a lookup returns (built once, not
# per hit).
_Group = tuple["Stored", ...]


def _item_size(entry: Entry, body: bytes) -> int:
    return len(body) + ENTRY_OVERHEAD_BYTES + sum(len(n) + len(v) for n, v in entry.headers)


def _group_size(group: _Group) -> int:
    return sum(_item_size(held.entry, held.body or b"") for held in group)


def _held(entry: Entry, body: bytes) -> Stored:
    return Stored(entry=entry, tier="memory", body=body)


class _LRU(LRUCache[str, _Group]):
    """An LRUCache that counts the variants it evicts."""

    evicted = 0

    def popitem(self) -> tuple[str, _Group]:
        key, group = super().popitem()
        self.evicted += len(group)
        return key, group


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryStatistics:
    """A snapshot of the memory tier."""

    bytes: int
    entries: int  # variants
    keys: int
    max_bytes: int
    object_max: int
    evictions: int  # variants evicted for space
    hits: int
    misses: int


class MemoryTier:
    """Bodies and metadata in memory, at most ``max_bytes`` in all (least recently used go
    first) and at most ``object_max`` of body per variant. Sync: no I/O, no awaits.

    Raises:
        ValueError: a size is negative, or the per-object cap exceeds the budget.
    """

    def __init__(self, *, max_bytes: int, object_max: int) -> None:
        if not 0 <= object_max <= max_bytes:
            raise ValueError("need 0 <= object_max <= max_bytes")
        self.max_bytes = max_bytes
        self.object_max = object_max
        self._cache = _LRU(maxsize=max_bytes, getsizeof=_group_size)
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return (
            f"<MemoryTier {self._cache.currsize}/{self.max_bytes} bytes, {len(self._cache)} keys>"
        )

    def _peek(self, key: str) -> _Group:
        """The key's group without refreshing its LRU position."""
        return Cache.__getitem__(self._cache, key) if key in self._cache else ()

    def _store(self, key: str, group: _Group) -> bool:
        if not group:
            self._cache.pop(key, None)
            return True
        try:
            self._cache[key] = group
        except ValueError:  # the group alone exceeds the budget
            self._cache.pop(key, None)
            return False
        return True

    def get(self, key: str) -> list[tuple[Entry, bytes]]:
        """Every variant of ``key`` held in memory (refreshes its LRU position)."""
        return [(held.entry, held.body or b"") for held in self.held(key)]

    def held(self, key: str) -> tuple[Stored, ...]:
        """Like :meth:`get`, as the ``Stored`` of each variant (tier ``"memory"``)."""
        group = self._cache.get(key, ())
        if group:
            self._hits += 1
        else:
            self._misses += 1
        return group

    def variants(self, key: str) -> frozenset[str]:
        """The variants of ``key`` held in memory (no LRU refresh)."""
        return frozenset(held.entry.variant for held in self._peek(key))

    def put(self, entry: Entry, body: bytes) -> bool:
        """Hold ``body`` for ``entry``, replacing that variant; False (and the variant is
        dropped) when the body is over the per-object cap or the key's variants do not fit."""
        others = tuple(
            held for held in self._peek(entry.key) if held.entry.variant != entry.variant
        )
        if len(body) > self.object_max:
            self._store(entry.key, others)
            return False
        return self._store(entry.key, (*others, _held(entry, body)))

    def update_meta(self, entry: Entry) -> None:
        """Replace the metadata of a held variant whose body ``entry`` still describes."""
        group = self._peek(entry.key)
        kept = tuple(
            _held(entry, held.body or b"") if held.entry.variant == entry.variant else held
            for held in group
            if held.entry.variant != entry.variant or held.entry.sha256 == entry.sha256
        )
        if kept != group:
            self._store(entry.key, kept)

    def remove(self, key: str, variant: str | None = None) -> int:
        """Drop one variant of ``key`` (all when None); returns variants dropped."""
        group = self._peek(key)
        kept = tuple(
            held for held in group if variant is not None and held.entry.variant != variant
        )
        self._store(key, kept)
        return len(group) - len(kept)

    def remove_where(self, predicate: Callable[[Entry], bool]) -> int:
        """Drop every variant ``predicate`` accepts; returns variants dropped."""
        dropped = 0
        for key in list(self._cache.keys()):
            group = self._peek(key)
            kept = tuple(held for held in group if not predicate(held.entry))
            dropped += len(group) - len(kept)
            self._store(key, kept)
        return dropped

    def statistics(self) -> MemoryStatistics:
        """A frozen snapshot of sizes and counters."""
        return MemoryStatistics(
            bytes=int(self._cache.currsize),
            entries=sum(len(group) for group in self._cache.values()),
            keys=len(self._cache),
            max_bytes=self.max_bytes,
            object_max=self.object_max,
            evictions=self._cache.evicted,
            hits=self._hits,
            misses=self._misses,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """One stored variant a lookup found; ``body`` is set for memory hits."""

    entry: Entry
    tier: Literal["memory", "disk"]
    body: bytes | None = None


@dataclass(slots=True)
class _DiskLookup:
    """A disk lookup under way, which concurrent lookups of the same key wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    found: list[Stored] | None = None  # None: it failed or was cancelled


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStatistics:
    """Both tiers' snapshots plus the facade's own counters."""

    memory: MemoryStatistics
    disk: DiskStatistics
    promotions: int  # variants copied from disk into memory
    promotion_failures: int  # disk bodies that failed their sha256 check on promotion


class Store:
    """The memory tier in front of the disk tier (see the module docstring for the rules)."""

    def __init__(self, memory: MemoryTier, disk: DiskTier) -> None:
        self.memory = memory
        self.disk = disk
        self._promotions = 0
        self._promotion_failures = 0
        self._disk_lookups: dict[str, _DiskLookup] = {}  # lookups under way, by key

    def __repr__(self) -> str:
        return f"<Store {self.memory!r} {self.disk!r}>"

    async def lookup(self, key: str) -> list[Stored]:
        """Every stored variant of ``key``: from memory when held there, else from disk,
        promoting the key into memory when all its bodies fit and verify.

        Raises:
            ValueError: ``key`` is not a lower-case hex digest.
        """
        held = self.memory.held(key)
        if held:
            return list(held)
        # A herd asking for one key at once shares one disk lookup (one worker-thread call
        # instead of one per request); a lookup that fails leaves each waiter to its own.
        pending = self._disk_lookups.get(key)
        if pending is not None:
            await pending.done.wait()
            if pending.found is not None:
                return list(pending.found)
            return await self._lookup_disk(key)
        pending = self._disk_lookups[key] = _DiskLookup()
        try:
            pending.found = await self._lookup_disk(key)
        finally:
            del self._disk_lookups[key]
            pending.done.set()
        return list(pending.found)

    async def _lookup_disk(self, key: str) -> list[Stored]:
        found = await self.disk.lookup_loaded(key, self.memory.object_max)
        self._promotion_failures += found.dropped  # dropped from disk and logged by the tier
        if found.bodies is None:
            return [Stored(entry=entry, tier="disk") for entry in found.entries]
        # Read from disk for this request (tier "disk"); held in memory for the next ones.
        loaded = [
            Stored(entry=entry, tier="disk", body=body)
            for entry, body in zip(found.entries, found.bodies, strict=True)
        ]
        if all(self.memory.put(s.entry, s.body or b"") for s in loaded):
            self._promotions += len(loaded)
        else:
            self.memory.remove(key)  # all or nothing; the bodies in hand still serve this request
        return loaded

    async def open_body(
        self, stored: Stored, *, chunk_size: int = 1 << 20
    ) -> AsyncGenerator[bytes, None]:
        """Yield the body of ``stored``: slices of the held bytes, or chunks streamed from
        disk. (Call :meth:`touch` for the hit; reading alone does not count as one.)

        Raises:
            CacheCorrupt: a disk body is missing or short (the entry is dropped).
        """
        if stored.body is not None:
            for start in range(0, len(stored.body), chunk_size):
                yield stored.body[start : start + chunk_size]
            return
        async with aclosing(self.disk.read(stored.entry, chunk_size=chunk_size)) as chunks:
            async for chunk in chunks:
                yield chunk

    def touch(self, stored: Stored) -> None:
        """Record a served hit: refreshes the entry in the disk tier's LRU even when it was
        served from memory, so entries hot in memory are not evicted from disk underneath
        (the memory tier's own order was refreshed by ``lookup``)."""
        self.disk.touch(stored.entry)

    async def open_writer(self, key: str, variant: str, *, batched: bool = False) -> StoreWriter:
        """A writer for a new body of ``(key, variant)``; commit or abort it. ``batched``
        gathers chunks per disk write (see :meth:`DiskWriter.write`): for fills whose temp
        file is only followed through ``bytes_written``, never read whole before the commit.

        Raises:
            ValueError: ``key`` or ``variant`` is not a hex digest.
        """
        return StoreWriter(self, await self.disk.open_writer(key, variant, batched=batched))

    async def update_meta(self, entry: Entry) -> None:
        """Rewrite the metadata of a stored entry in both tiers (304 freshening)."""
        self.memory.update_meta(entry)
        await self.disk.update_meta(entry)

    async def remove(self, key: str, variant: str | None = None) -> int:
        """Remove one variant of ``key`` (all when None) from both tiers; returns how many
        entries went (memory only holds what disk holds, so the larger count)."""
        # Memory first, at once: no request may hit there while the disk removal runs.
        in_memory = self.memory.remove(key, variant)
        return max(in_memory, await self.disk.remove(key, variant))

    async def purge_prefix(self, url_prefix: str) -> int:
        """Remove every entry whose URL starts with ``url_prefix`` from both tiers."""

        def doomed(entry: Entry) -> bool:
            return entry.url.startswith(url_prefix)

        in_memory = self.memory.remove_where(doomed)
        return max(in_memory, await self.disk.remove_where(doomed))

    def statistics(self) -> StoreStatistics:
        """A frozen snapshot of both tiers and the promotion counters."""
        return StoreStatistics(
            memory=self.memory.statistics(),
            disk=self.disk.statistics(),
            promotions=self._promotions,
            promotion_failures=self._promotion_failures,
        )


class StoreWriter:
    """A fill in progress: bytes go to the disk writer, and are also kept in memory while
    they fit the memory tier's per-object cap, so the committed entry can be held there."""

    def __init__(self, store: Store, writer: DiskWriter) -> None:
        self._store = store
        self._writer = writer
        self._chunks: list[bytes] | None = []
        self._kept = 0

    def __repr__(self) -> str:
        return f"<StoreWriter {self._writer!r} kept={self._chunks is not None}>"

    @property
    def tmp_path(self) -> Path:
        """The temp file being written (readers may follow it)."""
        return self._writer.tmp_path

    @property
    def bytes_written(self) -> int:
        return self._writer.bytes_written

    def open_reader(self) -> BinaryIO:
        """A read-only descriptor of the temp file (see :meth:`DiskWriter.open_reader`)."""
        return self._writer.open_reader()

    async def __aenter__(self) -> StoreWriter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.abort()

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` (see :meth:`DiskWriter.write`)."""
        await self._writer.write(chunk)
        if self._chunks is not None:
            self._kept += len(chunk)
            if self._kept <= self._store.memory.object_max:
                self._chunks.append(chunk)
            else:
                self._chunks = None

    async def flush(self) -> None:
        """Write what a batched writer gathered (see :meth:`DiskWriter.flush`)."""
        await self._writer.flush()

    async def commit(self, entry: Entry, *, expected_size: int | None = None) -> Entry:
        """Publish on disk (see :meth:`DiskWriter.commit`), then hold it in memory if it fit
        and the key's other variants are all held too; otherwise the key leaves memory."""
        final = await self._writer.commit(entry, expected_size=expected_size)
        memory = self._store.memory
        others = self._writer.variants_on_disk - {final.variant}
        body = b"".join(self._chunks) if self._chunks is not None else None
        self._chunks = None
        if body is None or not others <= memory.variants(final.key) or not memory.put(final, body):
            memory.remove(final.key)
        return final

    async def abort(self) -> None:
        """Discard the fill (idempotent, see :meth:`DiskWriter.abort`)."""
        self._chunks = None
        await self._writer.abort()
