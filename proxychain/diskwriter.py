"""A body on its way into the disk tier: :class:`DiskWriter`, from temp file to commit.

``DiskTier.open_writer`` hands one out per fill. The body goes to a temp file, hashed as it
goes, so that requests joining the fill can follow it while it grows; ``commit`` fsyncs it and
publishes it with its metadata (see ``diskfiles.py`` for why that order keeps every reader
safe), ``abort`` discards it. A writer uses its tier's worker threads and index, so it lives
and dies with the tier that opened it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

import trio

from .diskfiles import _commit, _discard, _vname, _write_all
from .diskmeta import encode_meta
from .entry import Entry
from .errors import CacheCorrupt

if TYPE_CHECKING:
    from .disk import DiskTier

__all__ = [
    "CLEANUP_TIMEOUT_SECONDS",
    "WRITE_BATCH_BYTES",
    "WRITE_BATCH_INTERVAL",
    "DiskWriter",
]

WRITE_BATCH_BYTES = 2 << 20  # a fill's chunks gathered per worker-thread call
WRITE_BATCH_INTERVAL = 0.050  # seconds; a chunk this long after the last write goes at once
CLEANUP_TIMEOUT_SECONDS = 10.0  # bound on shielded cleanup (aborting temp files)


class DiskWriter:
    """A body being written to a temp file; ``commit`` publishes it, ``abort`` discards it.

    ``tmp_path`` holds the first ``bytes_written`` bytes ``write`` accepted (all of them
    unless opened ``batched``, see :meth:`write`), so readers may follow it while it grows.
    Use as ``async with`` to abort on any exit before commit.
    """

    def __init__(
        self,
        tier: DiskTier,
        key: str,
        variant: str,
        tmp_path: Path,
        file: BinaryIO,
        reader: int,
        *,
        batched: bool = False,
    ) -> None:
        self.key = key
        self.variant = variant
        self.tmp_path = tmp_path
        self.bytes_written = 0
        self.variants_on_disk: frozenset[str] = frozenset()  # set by commit
        self._tier = tier
        self._file: BinaryIO | None = file
        self._reader: int | None = reader  # read-only descriptor of the temp file
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []  # accepted, not yet in the file
        self._pending_bytes = 0
        self._batched = batched
        self._flushed_at = trio.current_time()  # the open counts: a quick body is one batch

    def __repr__(self) -> str:
        state = "open" if self._file is not None else "closed"
        return f"<DiskWriter {self.key}/{_vname(self.variant)} {self.bytes_written} bytes {state}>"

    async def __aenter__(self) -> DiskWriter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.abort()

    def _write(self, file: BinaryIO, chunks: list[bytes]) -> None:
        for chunk in chunks:
            _write_all(file, chunk)
            self._hash.update(chunk)
            self.bytes_written += len(chunk)

    def _write_and_commit(
        self,
        started: list[bool],
        file: BinaryIO,
        reader: int,
        pending: list[bytes],
        tmp_meta: Path,
        key_dir: Path,
        entry: Entry,
    ) -> tuple[Entry, int, frozenset[str]]:
        """Write the last batch, then :func:`_commit` (in a worker thread)."""
        self._write(file, pending)
        final = entry.replace(body_size=self.bytes_written, sha256=self._hash.hexdigest())
        meta = encode_meta(final)
        try:
            variants = _commit(started, file, self.tmp_path, tmp_meta, key_dir, final, meta)
        finally:
            if started:  # the commit owns the files now, whatever its outcome
                os.close(reader)
        return final, len(meta), variants

    def open_reader(self) -> BinaryIO:
        """A read-only descriptor of the temp file (close it), for a reader that follows the
        body as it is written. It stays valid after the commit renames the file or an abort
        removes it. ``dup`` does no file-system I/O, so this runs on the event loop.

        Raises:
            trio.ClosedResourceError: after commit or abort.
        """
        if self._reader is None:
            raise trio.ClosedResourceError("writer is committed or aborted")
        return os.fdopen(os.dup(self._reader), "rb", buffering=0)

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` to the temp file.

        A writer opened ``batched`` gathers chunks arriving in a burst, up to
        ``WRITE_BATCH_BYTES`` per worker-thread call: under load a thread hop (and the GIL
        hand-over around it) costs more than the write. A chunk arriving
        ``WRITE_BATCH_INTERVAL`` or more after the last write (or the open) goes at once with
        what was gathered, so waiters following ``tmp_path`` see a slow body as it arrives;
        after a burst they may trail by up to a batch until the next chunk, :meth:`flush` or
        the commit, which writes the last batch itself. ``bytes_written`` counts what is in
        the file; without ``batched`` that is every byte accepted.

        Raises:
            trio.ClosedResourceError: after commit or abort.
            CacheCorrupt: the write failed (disk full, I/O error); the writer is aborted.
        """
        if self._file is None:
            raise trio.ClosedResourceError("writer is committed or aborted")
        if not chunk:
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if (
            not self._batched
            or self._pending_bytes >= WRITE_BATCH_BYTES
            or trio.current_time() - self._flushed_at >= WRITE_BATCH_INTERVAL
        ):
            await self.flush()

    async def flush(self) -> None:
        """Write the gathered chunks to the temp file.

        Raises:
            CacheCorrupt: the write failed (disk full, I/O error); the writer is aborted.
        """
        if self._file is None or not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._flushed_at = trio.current_time()
        try:
            await self._tier._run(self._write, self._file, pending)
        except OSError as exc:
            await self.abort()
            raise CacheCorrupt(f"writing the cache body failed: {exc}") from exc

    async def commit(self, entry: Entry, *, expected_size: int | None = None) -> Entry:
        """fsync and publish the body with ``entry`` as its metadata; then enforce the budget.

        Returns:
            ``entry`` with ``body_size`` and ``sha256`` filled in from what was written.

        Raises:
            CacheCorrupt: ``expected_size`` differs from the bytes written (nothing is
                published; the writer is aborted), or the files could not be written.

        An entry larger than the whole budget is published and then evicted at once.
            ValueError: ``entry`` names another key or variant than the writer.
            trio.ClosedResourceError: after commit or abort.
        """
        if self._file is None:
            raise trio.ClosedResourceError("writer is committed or aborted")
        if (entry.key, entry.variant) != (self.key, self.variant):
            raise ValueError("entry does not belong to this writer")
        size = self.bytes_written + self._pending_bytes
        if expected_size is not None and expected_size != size:
            await self.abort()
            raise CacheCorrupt(f"body is {size} bytes, upstream promised {expected_size}")
        tier = self._tier
        file, self._file = self._file, None
        reader, self._reader = self._reader, None
        assert reader is not None  # open while the file is
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        started: list[bool] = []
        try:
            # The last batch is written in the same worker-thread call as the commit.
            final, meta_size, self.variants_on_disk = await tier._run(
                self._write_and_commit,
                started,
                file,
                reader,
                pending,
                tier._tmp_path("meta.part"),
                tier._key_dir(self.key),
                entry,
            )
        except BaseException as exc:
            if not started:
                # Cancelled before the thread ran, or the last batch failed: abort() cleans up.
                self._file, self._reader = file, reader
                if isinstance(exc, OSError):
                    await self.abort()
                    raise CacheCorrupt(f"writing the cache body failed: {exc}") from exc
                self._pending = pending
                raise
            tier._writers.discard(self)
            if isinstance(exc, OSError):
                raise CacheCorrupt(f"committing the cache body failed: {exc}") from exc
            raise
        tier._writers.discard(self)
        tier._index.put((self.key, self.variant), meta_size + final.body_size, recent=True)
        await tier._enforce_budget()
        return final

    async def abort(self) -> None:
        """Discard the temp file. Idempotent; bounded and shielded so it runs when cancelled."""
        file, self._file = self._file, None
        reader, self._reader = self._reader, None
        self._pending, self._pending_bytes = [], 0
        if file is None:
            return
        self._tier._writers.discard(self)
        with trio.move_on_after(CLEANUP_TIMEOUT_SECONDS, shield=True):
            await self._tier._run(_discard, file, reader, self.tmp_path)
