"""Checking a package file against the digest announced for it, and the error when it fails.

A fill (``packages.finish_fill``), ``proxychain verify`` and ``proxychain warm`` all check a
body the same way: ``"<algo>:<hex>"`` and SRI digests against the file's hashes, a Go ``h1:``
hash against the ``go.mod`` or the module zip it names. The checks read files, so they block:
run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import zipfile
from pathlib import Path
from typing import BinaryIO

from . import goproxy, mirror
from .errors import UpstreamError

__all__ = ["HASH_ALGORITHMS", "IntegrityError", "check_file_digest"]

READ_CHUNK_BYTES = 1024 * 1024
# Every algorithm an announced digest may use (mirror.DIGEST_ALGORITHMS plus SRI's sha384).
HASH_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")


class IntegrityError(UpstreamError):
    """An upstream's body failed its announced digest, or could not be checked or rewritten.

    The entry is dropped, never served; the proxy tries the next upstream.
    """

    status_hint = 502

    def __init__(self, message: str, *, upstream: str = "", url: str = "") -> None:
        super().__init__(message, upstream=upstream)
        self.url = url


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
