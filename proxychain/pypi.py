"""PyPI's simple repository API (PEP 503, PEP 691) for a caching mirror, sans-IO.

Theory of operation
-------------------

Installers read two kinds of URL:

* **Index pages**: ``/simple/`` (every project) and ``/simple/<project>/`` (its files). They
  change with each upload or yank, so they are mutable metadata. The same URL serves HTML
  (PEP 503, ``text/html`` or ``application/vnd.pypi.simple.v1+html``) or JSON (PEP 691,
  ``application/vnd.pypi.simple.v1+json``) by content negotiation, so ``Accept`` is always
  part of the cache key (``forced_vary``), whatever the upstream's ``Vary`` says. Project names
  are normalised (PEP 503: runs of ``-_.`` become ``-``, lower case) so ``/simple/Foo_Bar``
  and ``/simple/foo-bar/`` share one entry.
* **Files**: distributions (and PEP 658 ``.metadata`` siblings) never change once uploaded
  (PyPI forbids re-uploading a file name), so they are immutable.

Index pages link to files on other hosts (``https://files.pythonhosted.org/packages/...``),
or relative to the page (``../../packages/...``). To keep installers on the proxy, the proxy
rewrites every link that points at the route's upstream or at one of its configured *file
hosts*:

* a link under the upstream's base URL becomes ``<proxy_prefix><path below the base>``;
* a link to a file host becomes ``<proxy_prefix>/files/<host[:port]><path>``.

:func:`map_file_path` inverts the second form, refusing hosts that are not configured (the
proxy must never become an open relay). Links elsewhere keep their target (relative ones are
made absolute, since the page now lives on the proxy). Fragments are kept, so
``#sha256=<hex>`` still reaches the installer, and each announced digest (fragment, PEP 691
``hashes``, PEP 658/714 ``data-core-metadata`` for the ``.metadata`` sibling) is returned keyed
by the route-relative file path, so the fill can verify bytes before committing them. PEP 658
metadata URLs are the file URL plus ``.metadata``, so they follow the rewritten links for free.

HTML is parsed with :mod:`html.parser`, never with regular expressions: only the start tags of
``<a>`` and ``<base>`` whose ``href`` changes are re-serialised (attribute values re-escaped,
every other attribute such as ``data-requires-python``, ``data-yanked`` or
``data-dist-info-metadata`` kept); all other bytes of the page are copied unchanged. JSON is
decoded and re-encoded with :mod:`json` (only ``files[].url`` changes). The caller recomputes
``Content-Length`` and ``ETag`` for a rewritten body.
"""

from __future__ import annotations

import html
import itertools
import json
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser

from .errors import RequestRefused
from .mirror import DEFAULT_METADATA, MalformedPath, MetadataPolicy, PathClass, RewriteResult

__all__ = [
    "FILES_PREFIX",
    "classify",
    "map_file_path",
    "normalize_name",
    "rewrite_index",
    "rewrite_location",
]

FILES_PREFIX = "/files/"

_NAME = re.compile(r"[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._\-]*[A-Za-z0-9]")  # PEP 508
_DIST_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz", ".egg", ".metadata")
_HASHES = ("sha1", "sha256", "sha384", "sha512")  # preference grows to the right
_ACCEPT = ("accept",)


def normalize_name(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def classify(path: str, *, metadata: MetadataPolicy = DEFAULT_METADATA) -> PathClass | None:
    """Classify a route-relative path of a PyPI route; ``None`` for an invalid project name."""
    if path in ("/simple", "/simple/"):
        return PathClass.make_metadata("simple-index", "/simple/", metadata, forced_vary=_ACCEPT)
    if path.startswith("/simple/"):
        name = urllib.parse.unquote(path.removeprefix("/simple/").removesuffix("/"))
        if not _NAME.fullmatch(name):
            return None
        key = f"/simple/{normalize_name(name)}/"
        return PathClass.make_metadata("project-page", key, metadata, forced_vary=_ACCEPT)
    if path.startswith(FILES_PREFIX):
        authority, _, rest = path.removeprefix(FILES_PREFIX).partition("/")
        if not authority or not rest:
            return None
        return PathClass.make_immutable("file", f"{FILES_PREFIX}{authority.lower()}/{rest}")
    if path.startswith("/packages/") or path.endswith(_DIST_SUFFIXES):
        return PathClass.make_immutable("file", path)
    return PathClass.make_other(path)


def _origin(base: str) -> tuple[str, str]:
    """``(scheme, lower-case netloc)`` of a configured base URL; bare hosts mean https."""
    parts = urllib.parse.urlsplit(base if "://" in base else f"https://{base}")
    return parts.scheme.lower(), parts.netloc.lower()


def map_file_path(path: str, *, file_hosts: Sequence[str]) -> tuple[str | None, str]:
    """Map a route-relative file path back to where it lives.

    Args:
        path: a route-relative path as produced by the rewriters.
        file_hosts: the route's configured file hosts (``"https://files.pythonhosted.org"``).

    Returns:
        ``(file_host_base, upstream_path)``: for ``/files/<host>/<p>`` the configured base URL
        (``scheme://host``) and ``/<p>``; otherwise ``(None, path)``, meaning the route's own
        upstream.

    Raises:
        RequestRefused: (404) ``<host>`` is not a configured file host.
        MalformedPath: a ``/files/`` path without host or file part.
    """
    if not path.startswith(FILES_PREFIX):
        return None, path
    authority, _, rest = path.removeprefix(FILES_PREFIX).partition("/")
    if not authority or not rest:
        raise MalformedPath(f"malformed file path {path!r}")
    for base in file_hosts:
        scheme, netloc = _origin(base)
        if netloc == authority.lower():
            return f"{scheme}://{netloc}", "/" + rest
    raise RequestRefused(f"file host {authority!r} is not configured", status_hint=404)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Mapper:
    """Maps absolute upstream and file-host URLs into the proxy's URL space."""

    scheme: str
    netloc: str
    base_path: str  # no trailing slash; "" for an upstream at the host root
    file_hosts: dict[str, str]  # netloc -> scheme
    proxy_prefix: str

    @classmethod
    def make(cls, upstream_base: str, file_hosts: Sequence[str], proxy_prefix: str) -> _Mapper:
        parts = urllib.parse.urlsplit(upstream_base)
        hosts = {netloc: scheme for scheme, netloc in map(_origin, file_hosts)}
        return cls(
            scheme=parts.scheme.lower(),
            netloc=parts.netloc.lower(),
            base_path=parts.path.rstrip("/"),
            file_hosts=hosts,
            proxy_prefix=proxy_prefix.rstrip("/"),
        )

    def route_path(self, url: str) -> str | None:
        """The route-relative path for absolute ``url``, or ``None`` if it is not ours."""
        parts = urllib.parse.urlsplit(url)
        scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        if (scheme, netloc) == (self.scheme, self.netloc):
            path = parts.path or "/"
            if path == self.base_path or path.startswith(self.base_path + "/"):
                below = path[len(self.base_path) :] or "/"
                return below + (f"?{parts.query}" if parts.query else "")
        if self.file_hosts.get(netloc) == scheme and parts.path.startswith("/"):
            return f"{FILES_PREFIX}{netloc}{tail}"
        return None

    def rewrite(self, url: str, page_url: str) -> tuple[str, str | None]:
        """``(new_url, route_path)``; a foreign ``url`` becomes ``(absolute url, None)``.

        Foreign relative links are made absolute because the page now lives on the proxy,
        where they would resolve to a different place.
        """
        absolute = _absolute(page_url, url.strip())
        route = self.route_path(absolute)
        if route is None:
            return (url if absolute == url else absolute), None
        fragment = absolute.partition("#")[2]
        return self.proxy_prefix + route + (f"#{fragment}" if fragment else ""), route


def _absolute(page_url: str, url: str) -> str:
    """``urljoin(page_url, url)``, with cheap paths for the common link shapes.

    A large index page has one link per project; ``urljoin`` costs tens of microseconds.
    """
    if url.startswith(("https://", "http://")):
        return url
    if url.startswith("/") and not url.startswith("//") and "/." not in url:
        path_start = page_url.find("/", page_url.find("//") + 2)
        return (page_url if path_start < 0 else page_url[:path_start]) + url
    return urllib.parse.urljoin(page_url, url)


def _fragment_digest(url: str) -> str | None:
    """``"<algo>:<hex>"`` from a PEP 503 ``#<algo>=<hex>`` fragment."""
    algo, sep, value = url.partition("#")[2].partition("=")
    if sep and algo.lower() in _HASHES and re.fullmatch(r"[0-9A-Fa-f]+", value):
        return f"{algo.lower()}:{value.lower()}"
    return None


def _best_hash(hashes: object) -> str | None:
    """The strongest known entry of a PEP 691 ``hashes`` dict as ``"<algo>:<hex>"``."""
    if not isinstance(hashes, dict):
        return None
    known = [a for a in _HASHES if isinstance(hashes.get(a), str)]
    return f"{known[-1]}:{hashes[known[-1]].lower()}" if known else None


class _IndexParser(HTMLParser):
    """Collects ``(start, end, replacement)`` edits for ``<a>``/``<base>`` start tags."""

    def __init__(self, text: str, mapper: _Mapper, page_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.mapper = mapper
        self.page_url = page_url
        self.edits: list[tuple[int, int, str]] = []
        self.digests: dict[str, str] = {}
        self._text = text
        # html.parser reports (line, column) and counts lines by "\n" only.
        lines = text.split("\n")
        self._line_starts = [0, *itertools.accumulate(len(line) + 1 for line in lines[:-1])]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, " /")

    def _tag(self, tag: str, attrs: list[tuple[str, str | None]], close: str) -> None:
        if tag not in ("a", "base"):
            return
        values = dict(attrs)
        href = values.get("href")
        if href is None:
            return
        new_href, route = self.mapper.rewrite(href, self.page_url)
        if tag == "base":
            # Later relative links resolve against the base; the base itself moves too.
            self.page_url = urllib.parse.urljoin(self.page_url, href)
        elif route is not None:
            self._record(route, href, values)
        if new_href == href:
            return
        raw = self.get_starttag_text()
        line, column = self.getpos()
        start = self._line_starts[line - 1] + column
        if raw is None or self._text[start : start + len(raw)] != raw:
            return  # positions disagree (should not happen): leave the tag alone
        parts = [f"<{tag}"]
        for name, value in attrs:
            value = new_href if name == "href" else value
            parts.append(f" {name}" if value is None else f' {name}="{html.escape(value)}"')
        self.edits.append((start, start + len(raw), "".join(parts) + close + ">"))

    def _record(self, route: str, href: str, values: dict[str, str | None]) -> None:
        digest = _fragment_digest(href)
        if digest is not None:
            self.digests[route] = digest
        # PEP 714 renamed data-dist-info-metadata (PEP 658) to data-core-metadata.
        meta = values.get("data-core-metadata") or values.get("data-dist-info-metadata")
        if meta and "?" not in route:
            meta_digest = _fragment_digest("#" + meta)
            if meta_digest is not None:
                self.digests[route + ".metadata"] = meta_digest


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or "utf-8"
    return "utf-8"


def _rewrite_html(body: bytes, charset: str, mapper: _Mapper, page_url: str) -> RewriteResult:
    try:
        text = body.decode(charset, errors="surrogateescape")
    except LookupError:
        charset = "utf-8"
        text = body.decode(charset, errors="surrogateescape")
    parser = _IndexParser(text, mapper, page_url)
    parser.feed(text)
    parser.close()
    if not parser.edits:
        return RewriteResult(body=body, digests=parser.digests)
    out: list[str] = []
    pos = 0
    for start, end, replacement in parser.edits:
        out.extend((text[pos:start], replacement))
        pos = end
    out.append(text[pos:])
    new_body = "".join(out).encode(charset, errors="surrogateescape")
    return RewriteResult(body=new_body, digests=parser.digests)


def _rewrite_json(body: bytes, mapper: _Mapper, page_url: str) -> RewriteResult:
    try:
        doc = json.loads(body)
    except ValueError:
        return RewriteResult(body=body, digests={})
    files = doc.get("files") if isinstance(doc, dict) else None
    digests: dict[str, str] = {}
    changed = False
    for item in files if isinstance(files, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        new_url, route = mapper.rewrite(item["url"], page_url)
        changed = changed or new_url != item["url"]
        item["url"] = new_url
        if route is None:
            continue
        digest = _best_hash(item.get("hashes"))
        if digest is not None:
            digests[route] = digest
        meta = item.get("core-metadata", item.get("dist-info-metadata"))
        meta_digest = _best_hash(meta)
        if meta_digest is not None and "?" not in route:
            digests[route + ".metadata"] = meta_digest
    if not changed:
        return RewriteResult(body=body, digests=digests)
    new_body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return RewriteResult(body=new_body, digests=digests)


def rewrite_index(
    body: bytes,
    content_type: str,
    *,
    page_url_path: str,
    upstream_base: str,
    file_hosts: Sequence[str],
    proxy_prefix: str,
) -> RewriteResult:
    """Rewrite an index page's file links to go through the proxy.

    Args:
        body: the decoded (not gzip-encoded) page.
        content_type: the response's ``Content-Type``; HTML and PEP 691 JSON are rewritten,
            anything else is returned unchanged.
        page_url_path: the route-relative path the page was fetched from (``/simple/foo/``);
            relative links resolve against ``upstream_base`` + this.
        upstream_base: the route's upstream base URL (``https://pypi.org``).
        file_hosts: base URLs of hosts whose files are proxied too.
        proxy_prefix: what rewritten links start with: the route prefix (``/pypi``) or an
            absolute proxy URL (``http://127.0.0.1:8080/pypi``).

    Returns:
        The new body (the same object when nothing changed) and the announced digests,
        keyed by route-relative file path.
    """
    mapper = _Mapper.make(upstream_base, file_hosts, proxy_prefix)
    page_url = upstream_base.rstrip("/") + page_url_path
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/html" or (
        media.startswith("application/vnd.pypi.simple.") and media.endswith("+html")
    ):
        return _rewrite_html(body, _charset(content_type), mapper, page_url)
    if media == "application/json" or (
        media.startswith("application/vnd.pypi.simple.") and media.endswith("+json")
    ):
        return _rewrite_json(body, mapper, page_url)
    return RewriteResult(body=body, digests={})


def rewrite_location(
    location: str,
    *,
    page_url_path: str,
    upstream_base: str,
    file_hosts: Sequence[str],
    proxy_prefix: str,
) -> str:
    """Rewrite a redirect's ``Location`` like an index link; foreign targets are unchanged.

    ``page_url_path`` is the route-relative path of the request that was redirected.
    """
    mapper = _Mapper.make(upstream_base, file_hosts, proxy_prefix)
    new_url, _ = mapper.rewrite(location, upstream_base.rstrip("/") + page_url_path)
    return new_url
