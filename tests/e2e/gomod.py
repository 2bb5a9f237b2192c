"""A Go module proxy tree built from Debian's module sources (``/usr/share/gocode/src``).

Each module version becomes the files a ``GOPROXY`` serves (``go help goproxy``):
``<module>/@v/list``, ``<version>.info``, ``<version>.mod`` and ``<version>.zip``, with module
paths case-encoded. The zip follows the module zip format (golang.org/x/mod/zip): every file
under ``<module>@<version>/``, no directory entries, no ``vendor/`` trees, no nested modules
(subdirectories with their own ``go.mod``), no version-control metadata, regular files only. A
module without a ``go.mod`` gets a synthesized one for ``.mod`` (as the Go proxy does) and
none inside the zip.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxychain import goproxy

GOCODE = Path("/usr/share/gocode/src")
_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", ".bzr", "vendor"})
# The zips' file times; any fixed time keeps the bytes reproducible.
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleSource:
    """One module version to publish: where its source lives and when it was "tagged"."""

    path: str
    version: str
    time: str = "2020-01-01T00:00:00Z"

    @property
    def source(self) -> Path:
        return GOCODE / self.path


# Small dependency-free modules from golang-github-pkg-errors-dev and golang-golang-x-sync-dev.
MODULES = (
    ModuleSource(path="github.com/pkg/errors", version="v0.9.1"),
    ModuleSource(path="golang.org/x/sync", version="v0.1.0"),
)


def module_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative slash path, file)`` for every file the module zip contains, sorted."""
    out: list[tuple[str, Path]] = []

    def walk(directory: Path, rel: str) -> None:
        for child in sorted(directory.iterdir()):
            name = f"{rel}{child.name}"
            if child.is_symlink():
                continue
            if child.is_dir():
                if child.name in _SKIPPED_DIRS or (child / "go.mod").exists():
                    continue
                walk(child, name + "/")
            elif child.is_file():
                out.append((name, child))

    walk(root, "")
    yield from out


def go_mod(module: ModuleSource) -> bytes:
    found = module.source / "go.mod"
    return found.read_bytes() if found.exists() else f"module {module.path}\n".encode()


def write_module(tree: Path, module: ModuleSource, *, zip_extra: bytes = b"") -> None:
    """Publish ``module`` into the GOPROXY tree at ``tree`` (``zip_extra`` tampers the zip)."""
    at = tree / goproxy.escape(module.path) / "@v"
    at.mkdir(parents=True, exist_ok=True)
    stem = goproxy.escape(module.version)
    (at / f"{stem}.info").write_text(json.dumps({"Version": module.version, "Time": module.time}))
    (at / f"{stem}.mod").write_bytes(go_mod(module))
    prefix = f"{module.path}@{module.version}/"
    with zipfile.ZipFile(at / f"{stem}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for rel, file in module_files(module.source):
            data = file.read_bytes()
            if zip_extra and rel.endswith(".go") and not rel.endswith("_test.go"):
                data += zip_extra
                zip_extra = b""
            archive.writestr(zipfile.ZipInfo(prefix + rel, _ZIP_TIME), data)
    listed = at / "list"
    versions = set(listed.read_text().split()) if listed.exists() else set()
    listed.write_text("\n".join(sorted(versions | {module.version})) + "\n")


def build_tree(tree: Path, modules: Sequence[ModuleSource] = MODULES) -> None:
    for module in modules:
        write_module(tree, module)


def go_sum_lines(modules: Sequence[ModuleSource] = MODULES) -> list[str]:
    """The go.sum lines for ``modules``, hashed with proxychain's own dirhash."""
    lines = []
    for module in modules:
        prefix = f"{module.path}@{module.version}/"
        files = [(prefix + rel, file.read_bytes()) for rel, file in module_files(module.source)]
        zip_h1 = goproxy.zip_hash(files, module=module.path, version=module.version)
        lines.append(f"{module.path} {module.version} {zip_h1}")
        lines.append(f"{module.path} {module.version}/go.mod {goproxy.mod_hash(go_mod(module))}")
    return lines
