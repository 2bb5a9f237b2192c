"""Fills shared between the worker processes of ``--workers N``: one upstream fetch per key.

Theory of operation:

* Within a process, ``coalesce.py`` makes concurrent misses for a key share one fill. Worker
  processes share the disk tier but not their memory, so without more a key asked of N
  workers at once would be fetched N times: harmless for the cache, but N times the WAN
  traffic for a hot file in a branch office.
* A worker about to lead a fill first takes the key's *fill lock*: an exclusive ``flock`` on
  ``<cache>/fills/<key>``. The kernel drops the lock when its holder closes the file or dies,
  so a crashed worker never leaves a key locked.
* Once the upstream's head is known and the body goes to a temp file, the leader *announces*
  the fill in the lock file: the response head, the entry's variant and Vary values, and the
  temp file's path, as one JSON line. It releases the lock when the fill ends, after the
  commit (or abort).
* A worker that finds the lock taken *mirrors* the sibling's fill: it registers a local fill
  (so its own requests for the key follow it as they follow any fill), polls the lock file
  until the announcement appears, opens the temp file and publishes its growth to the local
  waiters, who stream it as it is written. When the lock is released, the mirror checks that
  the store now holds the announced variant with the very file it streamed (same inode) and
  the same size; only then does the local fill finish, otherwise it fails, so a body the
  sibling abandoned is never served as complete. A lock released without an announcement (a
  304, a buffered package fill, an upstream error) ends the local fill with whatever the store
  then holds, and the waiters serve it or fetch on their own.
* Polling, not inotify: a few system calls per mirrored key every ``POLL_INTERVAL``, with no
  platform-specific watcher, and under trio's clock, so tests run it on a MockClock.

The lock file's operations (open, ``flock``, a small write) run on the event loop: they touch
no file data that is not already cached, and each takes microseconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from .coalesce import Fill, FillRegistry
from .diskmeta import check_key
from .entry import Entry
from .errors import ProxyChainError
from .http import Headers, ResponseHead
from .store import Store

__all__ = ["POLL_INTERVAL", "HeldLead", "SiblingFills"]

log = logging.getLogger("proxychain.siblingfill")

# How often a mirror looks at the sibling's fill: the lag its waiters may add, and the cost of
# a mirrored key (a flock, an fstat and maybe a small read each time).
POLL_INTERVAL = 0.005  # seconds
ANNOUNCEMENT_MAX_BYTES = 256 * 1024  # a head is at most a few tens of KiB


@dataclass(frozen=True, slots=True)
class _Announcement:
    head: ResponseHead
    entry: Entry
    tmp_path: str


class HeldLead:
    """This worker's lock on leading the fill of one key (see the module docstring)."""

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd: int | None = fd

    def __repr__(self) -> str:
        return f"<HeldLead {self._path.name} {'held' if self._fd is not None else 'released'}>"

    def announce(self, head: ResponseHead, entry: Entry, tmp_path: Path) -> None:
        """Tell the siblings mirroring this fill where its body is being written."""
        if self._fd is None:
            return
        doc = {
            "status": head.status,
            "reason": head.reason,
            "headers": [list(field) for field in head.headers],
            "variant": entry.variant,
            "vary": entry.vary,
            "url": entry.url,
            "tmp": str(tmp_path),
        }
        data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        try:
            os.pwrite(self._fd, data, 0)
        except OSError as exc:  # the siblings then wait for the end and read the store
            log.warning("cannot announce the fill of %s: %s", entry.url, exc)

    def release(self) -> None:
        """End the lead (idempotent): the file goes first, so a worker that opens the path
        afterwards makes a fresh lock instead of locking the one being dropped."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        os.close(fd)


class SiblingFills:
    """The fill locks of the workers sharing one cache directory."""

    def __init__(self, directory: Path, *, poll_interval: float = POLL_INTERVAL) -> None:
        self._dir = directory
        self._poll = poll_interval
        directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<SiblingFills {self._dir}>"

    def lead(self, key: str) -> HeldLead | None:
        """Take the lead of ``key``'s fill; ``None`` when a sibling holds it.

        Raises:
            ValueError: ``key`` is not a lower-case hex digest.
        """
        check_key(key)
        path = self._dir / key
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        # What a crashed leader announced must not pass for this fill's.
        os.ftruncate(fd, 0)
        return HeldLead(path, fd)

    async def mirror(
        self,
        fill: Fill,
        store: Store,
        registry: FillRegistry,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Mirror a sibling's fill of ``fill.key`` into ``fill`` until it ends, then end
        ``fill`` (it must be registered in ``registry``; this task takes it out). Started
        (``nursery.start``) once it has noted what the store held and watches the lock.

        Runs as a background task of the proxy: a failure here fails the local fill (its
        waiters fetch on their own), it never ends the proxy.
        """
        body: BinaryIO | None = None
        announced: _Announcement | None = None
        try:
            # What the store held before: an entry the sibling did not write (a stale one
            # that made this a miss) must not pass for the fill's result.
            before = {_identity(stored.entry) for stored in await store.lookup(fill.key)}
            try:
                lock: int | None = os.open(self._dir / fill.key, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # the sibling's fill has ended already
                lock = None
            missed = False  # announced, but the temp file was gone (renamed by the commit)
            task_status.started()
            try:
                while lock is not None:
                    ended = _released(lock)
                    if announced is None and not missed:
                        announced = _read_announcement(lock, fill.key)
                        if announced is not None:
                            body = _open_body(announced.tmp_path)
                            if body is None:
                                announced, missed = None, True
                            else:
                                reader = os.fdopen(os.dup(body.fileno()), "rb", buffering=0)
                                fill.publish_head(announced.head, announced.entry, reader, True)
                    if body is not None:
                        fill.publish_file_size(os.fstat(body.fileno()).st_size)
                    if ended:
                        break
                    await trio.sleep(self._poll)
            finally:
                if lock is not None:
                    os.close(lock)
            await self._finish(fill, store, announced, body, before)
        except (OSError, ProxyChainError) as exc:
            log.warning("mirroring a sibling's fill of %s failed: %s", fill.key, exc)
        finally:
            if body is not None:
                body.close()
            registry.end(fill)  # fails it unless _finish finished it

    async def _finish(
        self,
        fill: Fill,
        store: Store,
        announced: _Announcement | None,
        body: BinaryIO | None,
        before: set[tuple[str, str, float]],
    ) -> None:
        """The sibling's fill ended: finish ``fill`` with what it stored, or fail it."""
        stored = await store.lookup(fill.key)
        if announced is None or body is None:
            # Nothing was streamed here: the waiters serve what the sibling stored (a
            # buffered fill's commit, a body committed before the mirror opened it), or
            # fetch on their own.
            new = [s.entry for s in stored if _identity(s.entry) not in before]
            if new:
                fill.finish(new[0])
            return
        size = os.fstat(body.fileno()).st_size
        for candidate in stored:
            entry = candidate.entry
            if (
                entry.variant == announced.entry.variant
                and entry.body_size == size
                and await store.disk.is_body_file(entry, body)
            ):
                fill.publish_file_size(size)
                fill.finish(entry)
                return
        log.info("a sibling's fill of %s ended unstored; its followers here are cut", fill.key)


def _identity(entry: Entry) -> tuple[str, str, float]:
    return (entry.variant, entry.sha256, entry.response_time)


def _released(fd: int) -> bool:
    """Whether the leader let go of the lock behind ``fd`` (a shared lock is free)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)  # at once: a new leader must be able to take it
    return True


def _read_announcement(fd: int, key: str) -> _Announcement | None:
    """The leader's announcement, once it is written whole (one line, ends with a newline)."""
    data = os.pread(fd, ANNOUNCEMENT_MAX_BYTES, 0)
    if not data.endswith(b"\n"):
        return None
    try:
        doc = json.loads(data)
        head = ResponseHead(
            status=int(doc["status"]),
            reason=str(doc["reason"]),
            headers=Headers([(str(name), str(value)) for name, value in doc["headers"]]),
        )
        entry = Entry(
            key=key,
            variant=str(doc["variant"]),
            url=str(doc["url"]),
            status=head.status,
            reason=head.reason,
            headers=head.headers,
            vary={str(name): str(value) for name, value in doc["vary"].items()},
        )
        return _Announcement(head=head, entry=entry, tmp_path=str(doc["tmp"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("unreadable fill announcement ignored: %s", exc)
        return None


def _open_body(path: str) -> BinaryIO | None:
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None
