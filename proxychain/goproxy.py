"""The Go module proxy protocol (``go help goproxy``), sans-IO.

Theory of operation
-------------------

A ``GOPROXY`` server answers a small fixed set of GET paths, relative to its base URL:

* ``/<module>/@v/list`` and ``/<module>/@latest``: what versions exist. They change whenever a
  version is tagged, so they are mutable metadata.
* ``/<module>/@v/<version>.info``, ``.mod`` and ``.zip``. For a *canonical* semantic version
  (``v1.2.3``, ``v1.2.3-pre.1``, ``v2.0.0+incompatible``, pseudo-versions) the bytes never
  change: the checksum database pins them forever, so they are immutable. A non-canonical
  ``.info`` (``master``, ``v1.2``, a commit prefix) is a query whose answer moves: mutable.
* ``/sumdb/<name>/...``: the checksum database proxied (``go help module-auth``). ``tile/``
  paths are immutable: full tiles never change, and a partial tile ``.p/<W>`` names an exact
  width of an append-only log, so it never changes either (golang.org/x/mod/sumdb/tlog).
  ``lookup/<module>@<version>`` is cached as immutable: the hash lines for a module version
  never change, and the tree head the answer also carries may be old, which ``go`` accepts
  (it checks consistency with newer heads itself). ``supported`` and ``latest`` are mutable.

Module paths and versions travel *case-encoded*: every upper-case letter becomes ``!`` plus
its lower-case form (golang.org/x/mod/module ``EscapePath``), so case-insensitive file systems
and caches cannot conflate ``github.com/Azure`` with ``github.com/azure``. ``go`` may also send
``!`` as ``%21``. :func:`classify` therefore percent-decodes, unescapes, validates (a faithful
subset of ``module.CheckPath``) and re-escapes, and uses that canonical form as the cache key
and the upstream path. Malformed paths classify as ``None``: the proxy answers 404 at once.

``GOPRIVATE`` / ``GONOSUMDB``-style patterns (``privatepaths.match_prefix_patterns``) let the proxy
refuse to ask the public checksum database about private modules (:func:`sumdb_lookup_module`
names the module a lookup is about).

Integrity helpers implement golang.org/x/mod/sumdb/dirhash ``Hash1``: ``"h1:"`` plus the
base64 SHA-256 of the sorted lines ``"<sha256 hex>  <name>\\n"``, one per file. A ``go.mod``
hash is ``Hash1`` over the single file named ``go.mod``; a zip hash is ``Hash1`` over every
zip entry, names as stored (``<module>@<version>/<file>``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from .mirror import DEFAULT_METADATA, MalformedPath, MetadataPolicy, PathClass

__all__ = [
    "GoSumLine",
    "ModuleRequest",
    "SumdbRequest",
    "classify",
    "dirhash_h1",
    "escape",
    "hash1_from_digests",
    "is_canonical_version",
    "is_valid_module_path",
    "mod_hash",
    "parse",
    "parse_go_sum_line",
    "request_path",
    "sumdb_lookup_module",
    "unescape",
    "zip_hash",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleRequest:
    """A module path request: ``kind`` is list, latest, info, mod or zip.

    ``module`` and ``version`` are unescaped (real case); ``version`` is ``None`` for list
    and latest.
    """

    kind: str
    module: str
    version: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SumdbRequest:
    """A proxied checksum-database request: ``kind`` is supported, lookup, tile or latest.

    ``rest`` is what follows ``lookup/`` or ``tile/`` (unchanged), else ``""``.
    """

    name: str
    kind: str
    rest: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GoSumLine:
    """One go.sum line: ``is_gomod`` for ``<version>/go.mod`` lines; ``hash`` like ``h1:...``."""

    module: str
    version: str
    is_gomod: bool
    hash: str


# ---- case encoding (golang.org/x/mod/module EscapePath / UnescapePath) -----------------------


def escape(path: str) -> str:
    """Case-encode a module path or version: ``A`` -> ``!a``.

    Raises:
        MalformedPath: ``path`` contains ``!`` or a non-ASCII character.
    """
    out: list[str] = []
    for ch in path:
        if ch == "!" or not ch.isascii():
            raise MalformedPath(f"cannot escape {path!r}")
        out.append("!" + ch.lower() if "A" <= ch <= "Z" else ch)
    return "".join(out)


def unescape(escaped: str) -> str:
    """Decode the ``!`` case-encoding.

    Raises:
        MalformedPath: an upper-case letter, a non-ASCII character, or ``!`` not followed by a
            lower-case letter.
    """
    out: list[str] = []
    bang = False
    for ch in escaped:
        if not ch.isascii() or "A" <= ch <= "Z":
            raise MalformedPath(f"invalid escaped path {escaped!r}")
        if bang:
            if not "a" <= ch <= "z":
                raise MalformedPath(f"invalid escaped path {escaped!r}")
            out.append(ch.upper())
            bang = False
        elif ch == "!":
            bang = True
        else:
            out.append(ch)
    if bang:
        raise MalformedPath(f"invalid escaped path {escaped!r}")
    return "".join(out)


# ---- validity --------------------------------------------------------------------------------

_FIRST_ELEM = re.compile(r"[a-z0-9.\-]*\.[a-z0-9.\-]*")
_ELEM = re.compile(r"[A-Za-z0-9.\-_~]+")
_MAJOR_SUFFIX = re.compile(r"/v([0-9.]+)\Z")
_GOPKG_IN = re.compile(r"gopkg\.in/.+\.v(0|[1-9][0-9]*)(-unstable)?")
_PRERELEASE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z\-][0-9A-Za-z\-]*)"
_CANONICAL = re.compile(
    rf"v(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)"
    rf"(?:-{_PRERELEASE_ID}(?:\.{_PRERELEASE_ID})*)?(?:\+incompatible)?"
)
_QUERY_VERSION = re.compile(r"[0-9A-Za-z.\-_+~]+")


def is_valid_module_path(path: str) -> bool:
    """A subset of golang.org/x/mod/module ``CheckPath`` (Windows-name rules left out)."""
    elems = path.split("/")
    if not _FIRST_ELEM.fullmatch(elems[0]) or elems[0].startswith("-"):
        return False
    for elem in elems:
        if not _ELEM.fullmatch(elem) or elem.startswith(".") or elem.endswith("."):
            return False
    if path.startswith("gopkg.in/"):
        return _GOPKG_IN.fullmatch(path) is not None
    major = _MAJOR_SUFFIX.search(path)
    # "/v0", "/v1", "/v01" and "/v1.2" are not valid major-version suffixes.
    return major is None or not ("." in major[1] or major[1].startswith("0") or major[1] == "1")


def is_canonical_version(version: str) -> bool:
    """Whether ``version`` is a canonical module version (``module.CanonicalVersion(v) == v``)."""
    return _CANONICAL.fullmatch(version) is not None


# ---- path grammar ----------------------------------------------------------------------------

_SUMDB_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")
_TILE = re.compile(r"([0-9]+)/(data|[0-9]+)/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([0-9]+))?")
_FILE_KINDS = {".info": "info", ".mod": "mod", ".zip": "zip"}
_MAX_TILE_HEIGHT = 30  # golang.org/x/mod/sumdb/tlog rejects taller tiles


def _module(escaped: str) -> str | None:
    try:
        module = unescape(escaped)
    except MalformedPath:
        return None
    return module if is_valid_module_path(module) else None


def _version(escaped: str) -> str | None:
    try:
        version = unescape(escaped)
    except MalformedPath:
        return None
    ok = _QUERY_VERSION.fullmatch(version) and version not in (".", "..")
    return version if ok else None


def _valid_tile(rest: str) -> bool:
    m = _TILE.fullmatch(rest)
    if m is None:
        return False
    height = int(m[1])
    if not 1 <= height <= _MAX_TILE_HEIGHT:
        return False
    return m[4] is None or 1 <= int(m[4]) < 2**height


def _parse_sumdb(rest: str) -> SumdbRequest | None:
    name, _, op = rest.partition("/")
    if not _SUMDB_NAME.fullmatch(name):
        return None
    if op in ("supported", "latest"):
        return SumdbRequest(name=name, kind=op)
    if op.startswith("lookup/"):
        target = op.removeprefix("lookup/")
        return SumdbRequest(name=name, kind="lookup", rest=target)
    if op.startswith("tile/") and _valid_tile(op.removeprefix("tile/")):
        return SumdbRequest(name=name, kind="tile", rest=op.removeprefix("tile/"))
    return None


def _split_lookup(target: str) -> tuple[str, str] | None:
    escmod, sep, escver = target.partition("@")
    if not sep:
        return None
    module, version = _module(escmod), _version(escver)
    if module is None or version is None or not is_canonical_version(version):
        return None
    return module, version


def parse(path: str) -> ModuleRequest | SumdbRequest | None:
    """Parse a route-relative GOPROXY path (percent-encoding allowed).

    Returns:
        The request it names, or ``None`` when it is not a valid GOPROXY path.
    """
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if not decoded.startswith("/"):
        return None
    rest = decoded[1:]
    if rest.startswith("sumdb/"):
        req = _parse_sumdb(rest.removeprefix("sumdb/"))
        if req is not None and req.kind == "lookup":
            found = _split_lookup(req.rest)
            if found is None:
                return None
            canonical = f"{escape(found[0])}@{escape(found[1])}"
            req = SumdbRequest(name=req.name, kind="lookup", rest=canonical)
        return req
    if rest.endswith("/@latest"):
        module = _module(rest.removesuffix("/@latest"))
        return None if module is None else ModuleRequest(kind="latest", module=module)
    escmod, sep, file = rest.partition("/@v/")
    if not sep:
        return None
    module = _module(escmod)
    if module is None:
        return None
    if file == "list":
        return ModuleRequest(kind="list", module=module)
    stem, dot, ext = file.rpartition(".")
    kind = _FILE_KINDS.get(dot + ext)
    version = _version(stem) if kind else None
    if kind is None or version is None:
        return None
    return ModuleRequest(kind=kind, module=module, version=version)


def request_path(req: ModuleRequest | SumdbRequest) -> str:
    """The canonical route-relative path of ``req`` (escaped, no percent-encoding)."""
    if isinstance(req, SumdbRequest):
        tail = req.kind if not req.rest else f"{req.kind}/{req.rest}"
        return f"/sumdb/{req.name}/{tail}"
    base = "/" + escape(req.module)
    if req.kind == "latest":
        return base + "/@latest"
    if req.kind == "list":
        return base + "/@v/list"
    assert req.version is not None
    return f"{base}/@v/{escape(req.version)}.{req.kind}"


def classify(path: str, *, metadata: MetadataPolicy = DEFAULT_METADATA) -> PathClass | None:
    """Classify a GOPROXY path (see the module docstring); ``None`` when malformed."""
    req = parse(path)
    if req is None:
        return None
    key_path = request_path(req)
    if isinstance(req, SumdbRequest):
        if req.kind in ("tile", "lookup"):
            return PathClass.make_immutable(f"sumdb-{req.kind}", key_path)
        return PathClass.make_metadata(f"sumdb-{req.kind}", key_path, metadata)
    if req.version is not None and is_canonical_version(req.version):
        return PathClass.make_immutable(req.kind, key_path)
    return PathClass.make_metadata(req.kind, key_path, metadata)


def sumdb_lookup_module(path: str) -> tuple[str, str] | None:
    """``(module, version)`` a ``/sumdb/<name>/lookup/...`` path asks about, else ``None``.

    Lets the proxy answer lookups of ``GONOSUMDB``/``GOPRIVATE`` modules itself (403/404)
    instead of leaking private module paths to the public checksum database.
    """
    req = parse(path)
    if not isinstance(req, SumdbRequest) or req.kind != "lookup":
        return None
    return _split_lookup(req.rest)


# ---- GOPRIVATE / GONOSUMDB patterns (module.MatchPrefixPatterns) -----------------------------


# ---- integrity (golang.org/x/mod/sumdb/dirhash) ----------------------------------------------


def hash1_from_digests(files: Iterable[tuple[str, str]]) -> str:
    """``Hash1`` from ``(name, sha256 hex of content)`` pairs (hash big files incrementally).

    Raises:
        ValueError: a name contains a newline (dirhash refuses those).
    """
    summary = hashlib.sha256()
    for name, hexdigest in sorted(files):
        if "\n" in name:
            raise ValueError(f"dirhash: file name with newline: {name!r}")
        summary.update(f"{hexdigest}  {name}\n".encode())
    return "h1:" + base64.b64encode(summary.digest()).decode("ascii")


def dirhash_h1(files: Iterable[tuple[str, bytes]]) -> str:
    """``Hash1`` over ``(name, content)`` pairs (names sort as UTF-8 bytes, as Go's do)."""
    return hash1_from_digests((name, hashlib.sha256(data).hexdigest()) for name, data in files)


def mod_hash(go_mod: bytes) -> str:
    """The ``<module> <version>/go.mod h1:...`` hash: ``Hash1`` over one file named ``go.mod``."""
    return dirhash_h1([("go.mod", go_mod)])


def zip_hash(files: Iterable[tuple[str, bytes]], *, module: str, version: str) -> str:
    """The ``<module> <version> h1:...`` hash of a module zip from its entries, in any order.

    Raises:
        ValueError: an entry lies outside ``<module>@<version>/`` (a corrupt module zip).
    """
    prefix = f"{module}@{version}/"
    entries = list(files)
    for name, _ in entries:
        if not name.startswith(prefix):
            raise ValueError(f"zip entry {name!r} outside {prefix!r}")
    return dirhash_h1(entries)


def parse_go_sum_line(line: str) -> GoSumLine | None:
    """Parse ``<module> <version>[/go.mod] <hash>``; ``None`` for blank or malformed lines."""
    fields = line.split()
    if len(fields) != 3 or not re.fullmatch(r"h[0-9]+:\S+", fields[2]):
        return None
    module, version, digest = fields
    is_gomod = version.endswith("/go.mod")
    return GoSumLine(
        module=module,
        version=version.removesuffix("/go.mod"),
        is_gomod=is_gomod,
        hash=digest,
    )
