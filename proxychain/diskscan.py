"""Reading key directories of the disk tier (worker threads only): lookups and the index scan.

A lookup reads and checks every ``<v>.meta`` of one key (:func:`_read_key_dir`), and for small
entries their bodies too in the same worker-thread call (:func:`_read_key_dir_loaded`).
Inconsistent metadata is dropped here, if no concurrent commit replaced it meanwhile, and
returned as a :data:`Problem` for the tier to log and count: never raised.

The background index scan must not read every metadata file of a large tier: it works from
directory listings and ``stat`` alone (:func:`_stat_key_dir`), a batch of key directories per
worker-thread call, and reads a metadata file only where the listing looks odd. It also
removes orphaned bodies (a crash or a lost race between a commit's two renames) once they are
older than a grace period.
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from pathlib import Path

from .diskfiles import _body_name, _load
from .diskmeta import _HEX, decode_meta, encode_meta
from .entry import Entry
from .errors import CacheCorrupt

__all__ = ["Found", "Problem", "Scanned"]

# One metadata file found valid: the entry, its disk footprint and the metadata mtime.
Found = tuple[Entry, int, float]
# Metadata found inconsistent (and dropped): its path and why.
Problem = tuple[Path, str]
# One entry the index scan found: key, variant, bytes on disk (metadata + body), metadata mtime.
Scanned = tuple[str, str, int, float]
# No valid metadata is shorter than this (the smallest key, sha256 and numbers there are).
_MIN_META_BYTES = len(encode_meta(Entry(key="00", sha256="0" * 64)))


# ---- one key (lookups) -----------------------------------------------------------------------


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


# ---- many keys (the index scan, iter_entries) ------------------------------------------------


def _list_prefixes(objects: Path) -> list[Path]:
    return sorted(p for p in objects.iterdir() if re.fullmatch(r"[0-9a-f]{2}", p.name))


def _list_key_dirs(prefix_dir: Path) -> list[str]:
    """The key directory names under one ``objects/<aa>``, sorted."""
    try:
        names = os.listdir(prefix_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = prefix_dir.name
    return sorted(n for n in names if n.startswith(prefix) and _HEX.fullmatch(n))


def _scan_prefix(prefix_dir: Path) -> tuple[list[Found], list[Problem]]:
    """Every valid entry under one ``objects/<aa>``, decoded (for ``iter_entries``)."""
    found: list[Found] = []
    problems: list[Problem] = []
    for key in _list_key_dirs(prefix_dir):
        more, bad = _read_key_dir(prefix_dir / key, key)
        found += more
        problems += bad
    return found, problems


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
