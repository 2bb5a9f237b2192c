"""Blocking file calls of the disk tier, an entry or a temp file at a time (worker threads only).

These are the calls ``DiskTier`` and ``DiskWriter`` hand to ``trio.to_thread.run_sync``:
creating, committing and discarding temp files, opening and checking bodies, replacing
metadata, removing entries, and clearing crash leftovers. None of them may run on the event
loop. Reading whole key directories (lookups and the index scan) is in ``diskscan.py``.

*Why the body is named by its digest.* A fill writes its body to a temp file (hashing it as it
goes), fsyncs it and renames it into place; then writes the metadata, which records the body's
size and sha256, to a second temp file and renames that over ``<v>.meta``; then fsyncs the
directory (:func:`_commit`). A body is never visible under a name a metadata file could point
to before it is complete, and a metadata file can only point at a body with exactly the digest
it records: a crash or a race between processes can leave a body with no metadata (an orphan,
removed by the background scan after a grace period) or metadata whose body is gone (dropped on
lookup), but never a mismatched pair. Compared with one file holding a length-prefixed metadata
block and the body, this keeps a 304 freshening (RFC 9111 §4.3.4, :func:`_replace_meta`) a
rewrite of a few hundred bytes instead of a copy of the body. Duplicate fills by several
processes are harmless: the last rename wins, identical bodies share one name, and a reader
that already opened a file keeps reading its inode.

*Crash leftovers.* Temp files carry the writer's pid; :func:`_prepare` removes those of dead
processes (or older than a day) when a tier opens.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from .diskmeta import decode_meta
from .entry import Entry
from .errors import CacheCorrupt

__all__ = ["DEFAULT_CHUNK_BYTES", "TMP_MAX_AGE_SECONDS"]

DEFAULT_CHUNK_BYTES = 1 << 20  # bytes per read system call: what counts for big bodies
TMP_MAX_AGE_SECONDS = 86_400.0  # temp files older than a day are stale whatever their pid says

_TMP_NAME = re.compile(r"(\d+)-([0-9a-f]+)-\d+\.[a-z.]+")


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


# ---- crash leftovers -------------------------------------------------------------------------


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


# ---- bodies ----------------------------------------------------------------------------------


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


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb", buffering=0) as file:
        while chunk := file.read(DEFAULT_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# ---- writing and committing ------------------------------------------------------------------


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


# ---- removing --------------------------------------------------------------------------------


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
