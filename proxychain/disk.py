"""The disk tier: stored responses as files, shared safely by several processes.

Theory of operation
-------------------

Layout under ``root``::

    objects/<key[:2]>/<key>/<v>.meta            metadata (JSON, see encode_meta)
    objects/<key[:2]>/<key>/<v>.<sha256>.body   the body, named by its own digest
    tmp/<pid>-<token>-<n>.part                  bodies and metadata being written

where ``<v>`` is the variant key, or ``_`` for the empty variant. Keys and variants are hex
digests from ``keys.py`` and are validated as lower-case hex before they touch a path, so no
part of a request ever names a file.

*Why the body is named by its digest.* A fill writes its body to a temp file (hashing it as it
goes), fsyncs it and renames it into place; then writes the metadata, which records the body's
size and sha256, to a second temp file and renames that over ``<v>.meta``; then fsyncs the
directory. A body is never visible under a name a metadata file could point to before it is
complete, and a metadata file can only point at a body with exactly the digest it records: a
crash or a race between processes can leave a body with no metadata (an orphan, removed by the
background scan after a grace period) or metadata whose body is gone (dropped on lookup), but
never a mismatched pair. Compared with one file holding a length-prefixed metadata block and
the body, this keeps a 304 freshening (RFC 9111 §4.3.4, ``update_meta``) a rewrite of a few
hundred bytes instead of a copy of the body. Duplicate fills by several processes are harmless:
the last rename wins, identical bodies share one name, and a reader that already opened a file
keeps reading its inode.

*No full scan at startup.* ``lookup`` goes straight to the key's directory. Eviction needs an
LRU order of everything on disk; a background task builds it from directory listings and
``stat`` alone (sizes of both files, mtime of the metadata), a few hundred key directories per
worker-thread call, and reads a metadata file only where the listing looks odd (no body or
several for a variant, metadata too short to be valid). It keeps just key, variant, size and
mtime per entry, places what it discovers behind everything this process has used (oldest
metadata mtime first), then enforces the byte budget. Until the scan finishes the budget is
enforced over what is known. A periodic rescan picks up entries other processes committed and
forgets the ones they evicted; each process keeps its own recency.

*Crash leftovers.* Temp files carry the writer's pid; on open, temp files of dead processes
(or older than a day) are removed. Unreadable or inconsistent metadata is dropped and logged,
never raised out of ``lookup``; ``read`` raises :class:`~proxychain.errors.CacheCorrupt` when a
body is missing or short, and drops the entry.

Every blocking file call runs in a worker thread (``trio.to_thread.run_sync``) under a
``trio.CapacityLimiter``, never on the event loop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
from array import array
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import trio

from .entry import Entry
from .errors import CacheCorrupt
from .http import Headers

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

META_VERSION = 1
# Concurrent file operations; fsync-heavy commits should not starve reads of trio's default 40.
DEFAULT_DISK_THREADS = 16
DEFAULT_CHUNK_BYTES = 1 << 20  # bytes per read system call: what counts for big bodies
WRITE_BATCH_BYTES = 2 << 20  # a fill's chunks gathered per worker-thread call
WRITE_BATCH_INTERVAL = 0.050  # seconds; a chunk this long after the last write goes at once
DEFAULT_RESCAN_INTERVAL = 300.0  # seconds between index rescans (other processes' changes)
# A commit renames the body, then the metadata, microseconds apart; an unreferenced body older
# than this (filesystem seconds) is an orphan left by a crash or a lost race.
ORPHAN_GRACE_SECONDS = 60.0
TMP_MAX_AGE_SECONDS = 86_400.0  # temp files older than a day are stale whatever their pid says
CLEANUP_TIMEOUT_SECONDS = 10.0  # bound on shielded cleanup (aborting temp files)

_HEX = re.compile(r"[0-9a-f]{2,128}")
_SHA = re.compile(r"[0-9a-f]{64}")
_TMP_NAME = re.compile(r"(\d+)-([0-9a-f]+)-\d+\.[a-z.]+")
_META_FIELDS = frozenset(
    {"v", "key", "variant", "url", "status", "reason", "headers", "vary"}
    | {"request_time", "response_time", "body_size", "sha256", "verified"}
)
_T = TypeVar("_T")
_IndexKey = tuple[str, str]


def check_key(key: str, variant: str = "") -> None:
    """Reject anything but lower-case hex digests before they become paths.

    Raises:
        ValueError: ``key`` is not 2-128 lower-case hex digits, or ``variant`` is neither
            ``""`` nor such a digest.
    """
    if not isinstance(key, str) or not _HEX.fullmatch(key):
        raise ValueError(f"cache key must be lower-case hex, got {key!r}")
    if not isinstance(variant, str) or (variant and not _HEX.fullmatch(variant)):
        raise ValueError(f"variant key must be lower-case hex or empty, got {variant!r}")


# ---- metadata encoding (pure) ----------------------------------------------------------------


def encode_meta(entry: Entry) -> bytes:
    """The versioned JSON metadata for ``entry`` (header order is kept).

    Raises:
        ValueError: the key, variant or sha256 is not a lower-case hex digest.
    """
    check_key(entry.key, entry.variant)
    if not _SHA.fullmatch(entry.sha256):
        raise ValueError(f"sha256 must be a lower-case hex digest, got {entry.sha256!r}")
    doc = {
        "v": META_VERSION,
        "key": entry.key,
        "variant": entry.variant,
        "url": entry.url,
        "status": entry.status,
        "reason": entry.reason,
        "headers": [[name, value] for name, value in entry.headers],
        "vary": dict(entry.vary),
        "request_time": entry.request_time,
        "response_time": entry.response_time,
        "body_size": entry.body_size,
        "sha256": entry.sha256,
        "verified": entry.verified,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _field(doc: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = doc[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CacheCorrupt(f"metadata field {name!r} is not {kind.__name__}")
    return value


def decode_meta(data: bytes) -> Entry:
    """Parse metadata written by :func:`encode_meta`, validating every field.

    Raises:
        CacheCorrupt: the data is not metadata of a supported version, or a field is invalid.
    """
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheCorrupt(f"metadata is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != META_VERSION:
        raise CacheCorrupt("metadata has an unsupported version")
    if set(doc) != _META_FIELDS:
        raise CacheCorrupt(f"metadata fields differ: {sorted(set(doc) ^ _META_FIELDS)}")
    key, variant = _field(doc, "key", str), _field(doc, "variant", str)
    try:
        check_key(key, variant)
    except ValueError as exc:
        raise CacheCorrupt(str(exc)) from exc
    headers, vary = _field(doc, "headers", list), _field(doc, "vary", dict)
    if not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(s, str) for s in h) for h in headers
    ):
        raise CacheCorrupt("metadata headers are not name/value pairs")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in vary.items()):
        raise CacheCorrupt("metadata vary is not a string map")
    status, body_size = _field(doc, "status", int), _field(doc, "body_size", int)
    times = (_field(doc, "request_time", float), _field(doc, "response_time", float))
    sha256 = _field(doc, "sha256", str)
    if not 100 <= status <= 999 or body_size < 0 or not all(map(math.isfinite, times)):
        raise CacheCorrupt("metadata status, size or times out of range")
    if not _SHA.fullmatch(sha256):
        raise CacheCorrupt("metadata sha256 is not a hex digest")
    return Entry(
        key=key,
        variant=variant,
        url=_field(doc, "url", str),
        status=status,
        reason=_field(doc, "reason", str),
        headers=Headers((name, value) for name, value in headers),
        vary=vary,
        request_time=times[0],
        response_time=times[1],
        body_size=body_size,
        sha256=sha256,
        verified=_field(doc, "verified", str),
    )


# ---- blocking helpers (run in worker threads only) -------------------------------------------


def _vname(variant: str) -> str:
    return variant or "_"


def _body_name(variant: str, sha256: str) -> str:
    return f"{_vname(variant)}.{sha256}.body"


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _write_all(file: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view) or 0 :]


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb", buffering=0) as file:
        _write_all(file, data)
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fs_now(tmp: Path) -> float:
    """The filesystem's idea of now (mtime of a fresh file), to age files without a clock."""
    probe = tmp / f"{os.getpid()}-0-{secrets.token_hex(4)}.now"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        _unlink(probe)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare(root: Path, token: str) -> int:
    """Create the layout and remove temp files no live writer owns; returns how many."""
    (root / "objects").mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    cutoff = _fs_now(tmp) - TMP_MAX_AGE_SECONDS
    removed = 0
    for path in tmp.iterdir():
        match = _TMP_NAME.fullmatch(path.name)
        if match is None:
            stale = True
        elif int(match[1]) == os.getpid():
            stale = match[2] != token  # a previous tier in this process; one tier per root
        else:
            stale = not _pid_alive(int(match[1]))
        try:
            stale = stale or path.lstat().st_mtime < cutoff
            if stale:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


# One metadata file found valid: the entry, its disk footprint and the metadata mtime.
Found = tuple[Entry, int, float]
Problem = tuple[Path, str]


def _read_entry(key_dir: Path, name: str, key: str) -> tuple[Found | None, Problem | None]:
    """Read and check one ``<v>.meta``; drop it (if unchanged) when it is inconsistent."""
    variant = "" if name == "_.meta" else name[:-5]
    path = key_dir / name
    for attempt in (0, 1):
        try:
            with path.open("rb") as file:
                data = file.read()
                mtime = os.fstat(file.fileno()).st_mtime
        except FileNotFoundError:
            return None, None  # removed concurrently
        try:
            entry = decode_meta(data)
            if entry.key != key or entry.variant != variant:
                raise CacheCorrupt("metadata names another entry")
            try:
                size = (key_dir / _body_name(variant, entry.sha256)).stat().st_size
            except FileNotFoundError:
                raise CacheCorrupt("body file is missing") from None
            if size != entry.body_size:
                raise CacheCorrupt(f"body is {size} bytes, metadata says {entry.body_size}")
        except CacheCorrupt as exc:
            dropped = _unlink_if_unchanged(path, data)
            if dropped is None:
                return None, None  # another task or process dropped it first (and logged)
            if dropped or attempt == 1:
                return None, (path, str(exc))
            continue  # replaced by a concurrent commit while we looked: read the new one
        return (entry, len(data) + entry.body_size, mtime), None
    raise AssertionError("unreachable")  # pragma: no cover


def _unlink_if_unchanged(path: Path, data: bytes) -> bool | None:
    """Unlink ``path`` if it still holds ``data``: True when we did, False when another
    writer replaced it, None when it is already gone."""
    try:
        if path.read_bytes() != data:
            return False
        path.unlink()
    except FileNotFoundError:
        return None
    return True


def _read_key_dir(key_dir: Path, key: str) -> tuple[list[Found], list[Problem]]:
    """Every valid entry of one key (the index scan uses :func:`_stat_key_dir` instead)."""
    try:
        names = os.listdir(key_dir)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    found: list[Found] = []
    problems: list[Problem] = []
    for name in sorted(names):
        if name.endswith(".meta") and (name == "_.meta" or _HEX.fullmatch(name[:-5])):
            item, problem = _read_entry(key_dir, name, key)
            found.extend([item] if item else [])
            problems.extend([problem] if problem else [])
    return found, problems


def _scan_prefix(prefix_dir: Path) -> tuple[list[Found], list[Problem]]:
    """Every valid entry under one ``objects/<aa>``, decoded (for ``iter_entries``)."""
    found: list[Found] = []
    problems: list[Problem] = []
    for key in _list_key_dirs(prefix_dir):
        more, bad = _read_key_dir(prefix_dir / key, key)
        found += more
        problems += bad
    return found, problems


def _list_prefixes(objects: Path) -> list[Path]:
    return sorted(p for p in objects.iterdir() if re.fullmatch(r"[0-9a-f]{2}", p.name))


# ---- the index scan (blocking helpers, worker threads only) ----------------------------------

# One entry the index scan found: key, variant, bytes on disk (metadata + body), metadata mtime.
Scanned = tuple[str, str, int, float]
SCAN_BATCH_KEYS = 256  # key directories per worker-thread call of the index scan
SCAN_MERGE_BATCH = 2048  # found entries indexed between checkpoints of the event loop
# No valid metadata is shorter than this (the smallest key, sha256 and numbers there are).
_MIN_META_BYTES = len(encode_meta(Entry(key="00", sha256="0" * 64)))


def _list_key_dirs(prefix_dir: Path) -> list[str]:
    """The key directory names under one ``objects/<aa>``, sorted."""
    try:
        names = os.listdir(prefix_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = prefix_dir.name
    return sorted(n for n in names if n.startswith(prefix) and _HEX.fullmatch(n))


def _stat_key_dir(
    key_dir: Path, key: str, orphan_cutoff: float
) -> tuple[list[Scanned], list[Problem]]:
    """What the index needs of one key's entries, from the directory listing and ``stat``.

    An entry looks sound when its metadata is not implausibly short and exactly one body of
    its variant lies beside it: its footprint is then the two files' sizes and nothing is
    read (``lookup`` validates the metadata on use). Anything else (no body, several bodies,
    a short or vanishing file) is read and checked as ``lookup`` does, and dropped when
    inconsistent. Bodies no metadata can name, or that the checked metadata does not name,
    are removed once older than ``orphan_cutoff``.
    """
    try:
        with os.scandir(key_dir) as listing:
            files = {e.name: e for e in listing}
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    metas: list[str] = []  # variant names ("_" for none) that have metadata
    bodies: dict[str, list[str]] = {}  # variant name -> its body file names
    for name in files:
        if name.endswith(".meta"):
            vname = name[:-5]
            if vname == "_" or _HEX.fullmatch(vname):
                metas.append(vname)
        elif name.endswith(".body"):
            bodies.setdefault(name.split(".", 1)[0], []).append(name)
    found: list[Scanned] = []
    problems: list[Problem] = []
    wanted: set[str] = set()
    for vname in sorted(metas):
        variant = "" if vname == "_" else vname
        candidates = bodies.get(vname, ())
        if len(candidates) == 1:
            try:
                meta = files[f"{vname}.meta"].stat()
                body_size = files[candidates[0]].stat().st_size
            except FileNotFoundError:
                pass  # changed under us: look closer
            else:
                if meta.st_size >= _MIN_META_BYTES:
                    found.append((key, variant, meta.st_size + body_size, meta.st_mtime))
                    wanted.add(candidates[0])
                    continue
        item, problem = _read_entry(key_dir, f"{vname}.meta", key)
        if item is not None:
            entry, size, mtime = item
            found.append((key, variant, size, mtime))
            wanted.add(_body_name(variant, entry.sha256))
        if problem is not None:
            problems.append(problem)
    for names in bodies.values():
        for name in names:
            if name not in wanted:
                with suppress(FileNotFoundError):
                    if files[name].stat().st_mtime < orphan_cutoff:
                        os.unlink(files[name].path)
    return found, problems


def _stat_key_dirs(
    prefix_dir: Path, keys: list[str], orphan_cutoff: float
) -> tuple[list[Scanned], list[Problem]]:
    """:func:`_stat_key_dir` over a batch of one prefix's key directories."""
    found: list[Scanned] = []
    problems: list[Problem] = []
    for key in keys:
        more, bad = _stat_key_dir(prefix_dir / key, key, orphan_cutoff)
        found += more
        problems += bad
    return found, problems


def _remove_files(key_dir: Path, variants: Iterable[str] | None) -> list[str]:
    """Remove the given variants (every one when None); returns the variants whose metadata
    existed. Bodies go too, so a metadata file never outlives its body by more than a race."""
    try:
        names = os.listdir(key_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    wanted = None if variants is None else {_vname(v) for v in variants}
    removed: list[str] = []
    for name in names:
        vname = name.split(".", 1)[0]
        if wanted is not None and vname not in wanted:
            continue
        try:
            (key_dir / name).unlink()
        except FileNotFoundError:
            continue
        if name.endswith(".meta"):
            removed.append("" if vname == "_" else vname)
    with suppress(OSError):  # not empty: other variants remain or a commit is landing
        key_dir.rmdir()
    return removed


def _drop_if_same(key_dir: Path, entry: Entry) -> bool:
    """Remove ``entry``'s files if its metadata is still the one we read."""
    path = key_dir / f"{_vname(entry.variant)}.meta"
    try:
        if decode_meta(path.read_bytes()) != entry:
            return False
        path.unlink()
    except FileNotFoundError:
        return False  # already dropped or removed by someone else
    except CacheCorrupt:
        path.unlink(missing_ok=True)  # unreadable now: drop it too
    _unlink(key_dir / _body_name(entry.variant, entry.sha256))
    return True


def _open_body(path: Path, size: int) -> BinaryIO:
    try:
        file = path.open("rb", buffering=0)
    except FileNotFoundError:
        raise CacheCorrupt("body file is missing") from None
    actual = os.fstat(file.fileno()).st_size
    if actual != size:
        file.close()
        raise CacheCorrupt(f"body is {actual} bytes, metadata says {size}")
    return file


def _load(path: Path, size: int, sha256: str) -> bytes:
    with _open_body(path, size) as file:
        data = file.read(size + 1) if size else b""
    if len(data) != size:
        raise CacheCorrupt(f"body read {len(data)} bytes, metadata says {size}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CacheCorrupt("body does not match its recorded sha256")
    return data


def _read_key_dir_loaded(
    key_dir: Path, key: str, load_max: int
) -> tuple[list[Found], list[Problem], list[bytes | CacheCorrupt] | None]:
    """:func:`_read_key_dir`, plus every body (or why it failed its check) when each is at
    most ``load_max`` bytes; ``None`` for the bodies otherwise."""
    found, problems = _read_key_dir(key_dir, key)
    if not found or any(entry.body_size > load_max for entry, _, _ in found):
        return found, problems, None
    bodies: list[bytes | CacheCorrupt] = []
    for entry, _, _ in found:
        path = key_dir / _body_name(entry.variant, entry.sha256)
        try:
            bodies.append(_load(path, entry.body_size, entry.sha256))
        except CacheCorrupt as exc:
            bodies.append(exc)
    return found, problems, bodies


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb", buffering=0) as file:
        while chunk := file.read(DEFAULT_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _create(path: Path) -> tuple[BinaryIO, int]:
    """A new temp file: a writer, and a read-only descriptor for readers that follow it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    # Unbuffered: every accepted byte is in the file, for readers following it.
    file = os.fdopen(fd, "wb", buffering=0)
    try:
        return file, os.open(path, os.O_RDONLY)
    except BaseException:
        file.close()
        _unlink(path)
        raise


def _discard(file: BinaryIO | None, reader: int | None, *paths: Path) -> None:
    if file is not None:
        file.close()
    if reader is not None:
        os.close(reader)
    _unlink(*paths)


def _rename_into(tmp: Path, final: Path, key_dir: Path) -> None:
    """``os.replace`` that survives a concurrent rmdir of an emptied key directory."""
    for attempt in range(3):
        key_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, final)
            return
        except FileNotFoundError:
            if attempt == 2 or not tmp.exists():
                raise


def _referenced_sha(meta_path: Path) -> str | None:
    try:
        return decode_meta(meta_path.read_bytes()).sha256
    except (OSError, CacheCorrupt):
        return None


def _commit(
    started: list[bool],
    file: BinaryIO,
    tmp_body: Path,
    tmp_meta: Path,
    key_dir: Path,
    entry: Entry,
    meta: bytes,
) -> frozenset[str]:
    """fsync the body, rename it, then the metadata; returns the variants now stored."""
    started.append(True)
    try:
        try:
            os.fsync(file.fileno())
        finally:
            file.close()
        _write_synced(tmp_meta, meta)
        meta_path = key_dir / f"{_vname(entry.variant)}.meta"
        old_sha = _referenced_sha(meta_path)
        _rename_into(tmp_body, key_dir / _body_name(entry.variant, entry.sha256), key_dir)
        _rename_into(tmp_meta, meta_path, key_dir)
        _fsync_dir(key_dir)
    except BaseException:
        _unlink(tmp_body, tmp_meta)
        raise
    # Published; what follows is tidying and must not turn the commit into a failure.
    names: list[str] = [f"{_vname(entry.variant)}.meta"]
    with suppress(OSError):
        if old_sha is not None and old_sha != entry.sha256:
            _unlink(key_dir / _body_name(entry.variant, old_sha))
        names = os.listdir(key_dir)
    return frozenset("" if n == "_.meta" else n[:-5] for n in names if n.endswith(".meta"))


def _replace_meta(key_dir: Path, entry: Entry, meta: bytes, tmp_meta: Path) -> bool:
    try:
        size = (key_dir / _body_name(entry.variant, entry.sha256)).stat().st_size
    except FileNotFoundError:
        return False
    if size != entry.body_size:
        return False
    try:
        _write_synced(tmp_meta, meta)
        os.replace(tmp_meta, key_dir / f"{_vname(entry.variant)}.meta")
    except BaseException:
        _unlink(tmp_meta)
        raise
    return True


# ---- the trio shell --------------------------------------------------------------------------


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
        # Keys indexed with a variant other than "" (responses with Vary), and how many such
        # variants each: with ``(key, "")`` this tells "not indexed" without a set of all keys.
        self._varied: dict[str, int] = {}
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
        # (key, variant) -> (bytes on disk, sequence number of the last use); LRU first.
        self._index: OrderedDict[_IndexKey, tuple[int, int]] = OrderedDict()
        self._bytes = 0
        self._seq = 0
        self._evictions = 0
        self._corrupt = 0
        self._ready = trio.Event()
        self._removed_while_scanning: set[_IndexKey] | None = None
        self._writers: set[DiskWriter] = set()

    def __repr__(self) -> str:
        return (
            f"<DiskTier {str(self.root)!r} {self._bytes}/{self.max_bytes} bytes, "
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

    # -- index bookkeeping (sync, event loop only) --

    def _index_put(self, ikey: _IndexKey, size: int, *, recent: bool) -> None:
        old = self._index.get(ikey)
        if old is not None and not recent:
            return  # already known; what we know is fresher than a scan
        if old is None and ikey[1]:
            self._varied[ikey[0]] = self._varied.get(ikey[0], 0) + 1
        self._bytes += size - (old[0] if old else 0)
        self._index[ikey] = (size, self._seq)
        self._seq += 1
        self._index.move_to_end(ikey, last=recent)

    def _index_drop(self, ikey: _IndexKey) -> None:
        old = self._index.pop(ikey, None)
        if old is not None:
            self._bytes -= old[0]
            if ikey[1]:
                left = self._varied.pop(ikey[0]) - 1
                if left:
                    self._varied[ikey[0]] = left
        if self._removed_while_scanning is not None:
            self._removed_while_scanning.add(ikey)

    def _note_problems(self, problems: list[Problem]) -> None:
        for path, reason in problems:
            self._corrupt += 1
            logger.warning("dropped corrupt cache entry %s: %s", path, reason)

    async def _drop(self, entry: Entry, reason: str) -> None:
        if await self._run(_drop_if_same, self._key_dir(entry.key), entry):
            self._index_drop((entry.key, entry.variant))
            meta = self._key_dir(entry.key) / f"{_vname(entry.variant)}.meta"
            self._note_problems([(meta, reason)])

    async def _enforce_budget(self) -> None:
        while self._bytes > self.max_bytes and self._index:
            key, variant = next(iter(self._index))
            self._index_drop((key, variant))
            self._evictions += 1
            await self._run(_remove_files, self._key_dir(key), [variant])

    # -- background index --

    async def _scan(self) -> None:
        start = self._seq
        self._removed_while_scanning = set()
        # What was found, kept compact until the whole tier is seen: the (key, variant) tuples
        # become the index's keys; sizes and metadata mtimes are machine numbers.
        ikeys: list[_IndexKey] = []
        sizes = array("q")
        mtimes = array("d")
        try:
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
            await self._merge_scan(start, ikeys, sizes, mtimes)
        finally:
            self._removed_while_scanning = None

    async def _merge_scan(
        self, start: int, ikeys: list[_IndexKey], sizes: array[int], mtimes: array[float]
    ) -> None:
        """Index what a scan found behind everything used meanwhile, oldest metadata first,
        and forget what was indexed before the scan and is no longer on disk."""
        removed = self._removed_while_scanning or set()
        # Newest first, each pushed to the LRU end: the oldest metadata ends up evicted first
        # (ties keep the scan's order, as a stable sort does).
        order = sorted(range(len(ikeys)), key=mtimes.__getitem__, reverse=True)
        still = self._seq  # found again: stamped as seen by this scan, its place kept
        self._seq += 1
        for n, i in enumerate(order):
            if n % SCAN_MERGE_BATCH == SCAN_MERGE_BATCH - 1:
                await trio.lowlevel.checkpoint()
            ikey = ikeys[i]
            if ikey in removed:
                continue
            old = self._index.get(ikey)
            if old is None:
                self._index_put(ikey, sizes[i], recent=False)
            elif old[1] < start:
                self._index[ikey] = (old[0], still)
        gone = [ikey for ikey, (_, seq) in self._index.items() if seq < start]
        for ikey in gone:
            self._index_drop(ikey)  # another process removed it

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
        return (
            self._exclusive
            and self._ready.is_set()
            and (key, "") not in self._index
            and key not in self._varied
        )

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
            self._index_put((entry.key, entry.variant), size, recent=False)
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
            self._index_put((entry.key, entry.variant), len(meta) + entry.body_size, recent=True)

    async def remove(self, key: str, variant: str | None = None) -> int:
        """Remove one variant of ``key`` (every variant when None); returns entries removed."""
        check_key(key, variant or "")
        removed = await self._run(
            _remove_files, self._key_dir(key), None if variant is None else [variant]
        )
        for gone in removed:
            self._index_drop((key, gone))
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
        ikey = (entry.key, entry.variant)
        if ikey in self._index:
            # Its size is unchanged, and its sequence number only tells a scan what was
            # registered after it started, which a hit does not do.
            self._index.move_to_end(ikey)

    def statistics(self) -> DiskStatistics:
        """A frozen snapshot of sizes and counters."""
        return DiskStatistics(
            bytes=self._bytes,
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
        tier._index_put((self.key, self.variant), meta_size + final.body_size, recent=True)
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
