"""Lockfiles ``proxychain warm`` reads, and the URLs on the proxy they pin.

Theory of operation
-------------------

A lockfile names exact artefacts and their digests; warming the cache means fetching each of
them through the proxy's route for its ecosystem. This module turns the text of a lockfile
into what to fetch, and leaves the fetching to :mod:`proxychain.warm`. The kind comes from the
file name (:func:`detect_kind`):

* ``go.sum`` (:func:`parse_go_sum`): a :class:`WarmItem` per file on the Go route, ``.mod``
  for a ``/go.mod`` line, ``.info`` and ``.zip`` for a module line; the ``h1:`` hash travels
  with the item so the fetched body can be checked.
* ``requirements*.txt`` with ``--hash`` options (:func:`parse_requirements`) and PEP 751
  ``pylock*.toml`` (:func:`parse_pylock`): a :class:`PyRequirement` per pinned project, with
  the sha256 digests the lockfile allows. Which files those are is only known from the
  project's index page, so :func:`select_files` picks them from a page (PEP 691 JSON or PEP
  503 HTML) once the shell has fetched it.
* ``package-lock.json`` / ``npm-shrinkwrap.json`` (:func:`parse_package_lock`): a
  :class:`WarmItem` per ``resolved`` tarball, mapped onto the npm route, with its
  ``integrity``.

Each item carries the ``Accept-Encoding`` its ecosystem's client sends, so the variant the
warm run stores is the one the client's later request hits. A lockfile that cannot be parsed
raises :class:`LockfileError` before anything is fetched.
"""

from __future__ import annotations

import json
import re
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

from . import goproxy, pypi
from .errors import ProxyChainError

__all__ = [
    "GO_ACCEPT_ENCODING",
    "NPM_ACCEPT_ENCODING",
    "PIP_ACCEPT_ENCODING",
    "LockKind",
    "LockfileError",
    "PyRequirement",
    "WarmItem",
    "detect_kind",
    "parse_go_sum",
    "parse_package_lock",
    "parse_pylock",
    "parse_requirements",
    "route_target",
    "select_files",
]

# Accept-Encoding as each client sends it: upstreams often answer "Vary: Accept-Encoding",
# and a variant stored for another value would not serve the client's later request.
GO_ACCEPT_ENCODING = "gzip"  # Go's net/http transport
PIP_ACCEPT_ENCODING = "gzip, deflate"  # pip's vendored urllib3
NPM_ACCEPT_ENCODING = "gzip,deflate"  # npm's minipass-fetch

LockKind = Literal["go", "requirements", "pylock", "npm"]


class LockfileError(ProxyChainError):
    """A lockfile could not be read or parsed."""

    status_hint = 400


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmItem:
    """One URL to fetch: ``target`` is the origin-form path on the proxy."""

    target: str
    expected: str | None = None  # a digest to check ("sha256:..", SRI, "h1:..")
    key_path: str = ""  # route-relative path, for h1: hashes
    accept: str = ""
    accept_encoding: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PyRequirement:
    """A pinned Python project and the sha256 digests of the files allowed for it."""

    name: str
    version: str
    hashes: frozenset[str]  # "sha256:<hex>"


def detect_kind(path: Path) -> LockKind:
    """The lockfile kind from its name.

    Raises:
        LockfileError: the name is not one of the known lockfile names.
    """
    name = path.name.lower()
    if name == "go.sum":
        return "go"
    if name in ("package-lock.json", "npm-shrinkwrap.json"):
        return "npm"
    if re.fullmatch(r"pylock(\.[^.]+)?\.toml", name):
        return "pylock"
    if name.endswith(".txt"):
        return "requirements"
    raise LockfileError(
        f"{path}: unknown lockfile kind (expected go.sum, requirements*.txt, pylock*.toml, "
        "package-lock.json or npm-shrinkwrap.json)"
    )


def route_target(prefix: str, path: str) -> str:
    """The origin-form target of the route-relative ``path`` on the route at ``prefix``."""
    return prefix.rstrip("/") + path


def _go_item(prefix: str, path: str, expected: str | None) -> WarmItem:
    return WarmItem(
        target=route_target(prefix, path),
        expected=expected,
        key_path=path if expected else "",
        accept_encoding=GO_ACCEPT_ENCODING,
    )


def parse_go_sum(text: str, prefix: str) -> list[WarmItem]:
    """Items for a ``go.sum``: ``.mod`` per go.mod line, ``.info`` and ``.zip`` per zip line."""
    items: list[WarmItem] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parsed = goproxy.parse_go_sum_line(line)
        if parsed is None:
            raise LockfileError(f"go.sum line {number}: expected '<module> <version> <hash>'")
        try:
            base = f"/{goproxy.escape(parsed.module)}/@v/{goproxy.escape(parsed.version)}"
        except ValueError as exc:
            raise LockfileError(f"go.sum line {number}: {exc}") from None
        h1 = parsed.hash if parsed.hash.startswith("h1:") else None
        if parsed.is_gomod:
            items.append(_go_item(prefix, base + ".mod", h1))
        else:
            items += [_go_item(prefix, base + ".info", None), _go_item(prefix, base + ".zip", h1)]
    return items


def _logical_lines(text: str) -> Iterator[str]:
    """Requirement lines with ``\\`` continuations joined and comments removed."""
    buffer = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw)
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            yield buffer.strip()
        buffer = ""
    if buffer.strip():
        yield buffer.strip()


def parse_requirements(text: str) -> list[PyRequirement]:
    """Pinned requirements with hashes (``pip-compile --generate-hashes`` output).

    Raises:
        LockfileError: a requirement is not pinned with ``==`` or has no ``--hash``.
    """
    out: list[PyRequirement] = []
    for line in _logical_lines(text):
        if line.startswith("-"):
            continue  # options such as --index-url or -r: not files to fetch
        spec, *options = line.split()
        hashes = frozenset(
            _normal_hash(opt.split("=", 1)[1]) for opt in options if opt.startswith("--hash=")
        )
        spec = spec.split(";", 1)[0]
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?===?([^\s,;]+)", spec)
        if match is None:
            raise LockfileError(f"requirement {spec!r} is not pinned with ==")
        if not hashes:
            raise LockfileError(f"requirement {spec!r} has no --hash")
        out.append(
            PyRequirement(name=pypi.normalize_name(match[1]), version=match[3], hashes=hashes)
        )
    return out


def _normal_hash(value: str) -> str:
    algo, _, digest = value.partition(":")
    return f"{algo.lower()}:{digest.lower()}"


def parse_pylock(text: str) -> list[PyRequirement]:
    """Packages of a PEP 751 ``pylock.toml`` with the sha256 of their wheels and sdist."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockfileError(f"pylock: {exc}") from None
    out: list[PyRequirement] = []
    for package in doc.get("packages", []):
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        hashes = frozenset(
            f"sha256:{f['hashes']['sha256'].lower()}"
            for f in files
            if isinstance(f.get("hashes"), dict) and "sha256" in f["hashes"]
        )
        if not hashes:
            continue  # a VCS or directory package: nothing an index serves
        out.append(
            PyRequirement(
                name=pypi.normalize_name(package["name"]),
                version=str(package.get("version", "")),
                hashes=hashes,
            )
        )
    return out


def parse_package_lock(text: str, prefix: str) -> list[WarmItem]:
    """Every ``resolved`` tarball of a ``package-lock.json`` (v1, v2 or v3), on the npm route.

    A URL already on the route (``.../npm/x/-/x-1.tgz``) keeps its path below the prefix;
    any other registry URL contributes its whole path.
    """
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise LockfileError(f"package-lock.json: {exc}") from None
    found: dict[str, str | None] = {}
    for meta in _npm_entries(doc):
        resolved = meta.get("resolved")
        if not isinstance(resolved, str) or not resolved.startswith(("http://", "https://")):
            continue  # links, git and file dependencies
        path = urllib.parse.urlsplit(resolved).path
        marker = "/" + prefix.strip("/") + "/"
        if marker != "//" and marker in path:
            path = "/" + path.split(marker, 1)[1]
        integrity = meta.get("integrity")
        found[path] = integrity if isinstance(integrity, str) else None
    return [
        WarmItem(
            target=route_target(prefix, path),
            expected=integrity,
            key_path=path,
            accept_encoding=NPM_ACCEPT_ENCODING,
        )
        for path, integrity in found.items()
    ]


def _npm_entries(doc: object) -> Iterator[dict[str, object]]:
    if not isinstance(doc, dict):
        return
    packages = doc.get("packages")
    if isinstance(packages, dict):
        for name, meta in packages.items():
            if name and isinstance(meta, dict):
                yield meta
        return
    stack = [doc.get("dependencies")]  # lockfile v1
    while stack:
        deps = stack.pop()
        if isinstance(deps, dict):
            for meta in deps.values():
                if isinstance(meta, dict):
                    yield meta
                    stack.append(meta.get("dependencies"))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def select_files(
    page: bytes, content_type: str, page_url: str, requirement: PyRequirement
) -> list[tuple[str, str]]:
    """``(absolute URL without fragment, "sha256:<hex>")`` of the page's files the
    requirement's hashes allow (PEP 691 JSON or PEP 503 HTML)."""
    links: list[tuple[str, str | None]] = []
    if "json" in content_type:
        doc = json.loads(page)
        for item in doc.get("files", []):
            sha = item.get("hashes", {}).get("sha256")
            links.append((item["url"], f"sha256:{sha.lower()}" if sha else None))
    else:
        parser = _Links()
        parser.feed(page.decode("utf-8", errors="replace"))
        for href in parser.hrefs:
            algo, _, value = urllib.parse.urlsplit(href).fragment.partition("=")
            links.append((href, f"{algo.lower()}:{value.lower()}" if value else None))
    out = []
    for href, digest in links:
        if digest in requirement.hashes:
            url = urllib.parse.urljoin(page_url, href).split("#", 1)[0]
            out.append((url, digest))
    return out
