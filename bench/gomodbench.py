"""The ``gomod`` scenario: cold and warm ``go mod download`` of a fixed module set, direct
versus through proxychain (and nginx ``proxy_cache``), timed end to end.

The upstream is a GOPROXY file tree built by the e2e tests' builder (``tests/e2e/gomod.py``)
from Debian's ``golang-*-dev`` module sources (``bash bench/setup.sh`` installs them), served by
``python -m http.server`` on loopback: that is the "direct" column. In front of the same tree
run a proxychain with one ``kind = "goproxy"`` route at ``/go/`` and an nginx ``proxy_cache``,
each started afresh (empty cache) for every repetition. A repetition times, with a fresh
``GOMODCACHE`` every time (``GOSUMDB=off``, ``GOFLAGS=-mod=mod``, the app's ``go.sum`` hashed by
proxychain's own dirhash so ``go`` checks every byte):

* ``direct``: ``go mod download`` straight from the static server;
* per proxy, ``cold``: the first download through the fresh proxy (every file a miss);
* per proxy, ``warm``: the second one (every file a hit).

The rows give the median of the repetitions and the upstream requests each run caused
(counted in the static server's request log).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import targets
import trio
from procs import Managed, StartError
from scenarios import Bench, Row

__all__ = ["FULL_SET", "QUICK_SET", "GoModule", "gomod"]

REPO = targets.BENCH_DIR.parent
GO_TIMEOUT_S = 300.0  # one go mod download; a hung one fails the scenario, not the bench
PROXIES = ("nginx", "proxychain")  # the caching targets that run here (by --targets)


@dataclass(frozen=True, kw_only=True)
class GoModule:
    """One module of the set: its path, the version the tree publishes, its Debian package."""

    path: str
    version: str
    package: str


# Dependency-free modules (no requirements in their go.mod), so the app's go.mod lists the
# whole module graph; bench/setup.sh installs the packages. klauspost/compress brings a 40 MiB
# zip, BurntSushi/toml a case-encoded path (!burnt!sushi), go-spew and go-difflib no go.mod.
FULL_SET = (
    GoModule(
        path="github.com/pkg/errors", version="v0.9.1", package="golang-github-pkg-errors-dev"
    ),
    GoModule(path="golang.org/x/sync", version="v0.1.0", package="golang-golang-x-sync-dev"),
    GoModule(
        path="github.com/google/uuid", version="v1.3.0", package="golang-github-google-uuid-dev"
    ),
    GoModule(
        path="github.com/davecgh/go-spew",
        version="v1.1.1",
        package="golang-github-davecgh-go-spew-dev",
    ),
    GoModule(
        path="github.com/pmezard/go-difflib",
        version="v1.0.0",
        package="golang-github-pmezard-go-difflib-dev",
    ),
    GoModule(
        path="github.com/spf13/pflag", version="v1.0.6", package="golang-github-spf13-pflag-dev"
    ),
    GoModule(
        path="github.com/google/go-cmp", version="v0.5.9", package="golang-github-google-go-cmp-dev"
    ),
    GoModule(
        path="github.com/klauspost/compress",
        version="v1.15.12",
        package="golang-github-klauspost-compress-dev",
    ),
    GoModule(
        path="github.com/golang/snappy", version="v0.0.2", package="golang-github-golang-snappy-dev"
    ),
    GoModule(
        path="github.com/BurntSushi/toml",
        version="v1.2.0",
        package="golang-github-burntsushi-toml-dev",
    ),
)
QUICK_SET = FULL_SET[:2]  # the e2e tests' two small modules


def _gomod_builder() -> ModuleType:
    """The e2e tests' GOPROXY tree builder (``tests/e2e/gomod.py``, imported from the repo)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.e2e import gomod as builder

    return builder


def _go_mod(modules: Sequence[GoModule]) -> str:
    lines = "".join(f"\t{m.path} {m.version}\n" for m in modules)
    return f"module example.com/bench\n\ngo 1.19\n\nrequire (\n{lines})\n"


def _build(tree: Path, app: Path, modules: Sequence[GoModule]) -> None:
    """The GOPROXY tree and an app whose go.mod requires every module (blocking)."""
    builder = _gomod_builder()
    sources = [builder.ModuleSource(path=m.path, version=m.version) for m in modules]
    builder.build_tree(tree, sources)
    app.mkdir(parents=True, exist_ok=True)
    (app / "go.mod").write_text(_go_mod(modules))
    (app / "go.sum").write_text("\n".join(builder.go_sum_lines(sources)) + "\n")


def _rmtree(path: Path) -> None:
    """Remove a module cache (go makes it read-only)."""

    def writable(func: Any, p: str, _exc: Any) -> None:
        os.chmod(p, 0o700)
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=writable)


def _requests_logged(log: Path) -> int:
    """GET requests the static server has logged so far."""
    try:
        return log.read_text(errors="replace").count('"GET ')
    except OSError:
        return 0


@dataclass(kw_only=True)
class _Run:
    seconds: float
    upstream: int


class _Go:
    """Runs ``go mod download`` in the app with a fresh module cache each time."""

    def __init__(self, go: str, home: Path, app: Path, static_log: Path) -> None:
        self.go = go
        self.home = home
        self.app = app
        self.static_log = static_log
        self.runs = 0

    def env(self, goproxy: str, modcache: Path) -> dict[str, str]:
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
        env.update(
            HOME=str(self.home),
            GOPROXY=goproxy,
            GOSUMDB="off",
            GOFLAGS="-mod=mod",
            GONOSUMDB="",
            GOPRIVATE="",
            GOENV="off",
            GO111MODULE="on",
            GOTOOLCHAIN="local",
            GOPATH=str(self.home / "gopath"),
            GOMODCACHE=str(modcache),
            GOCACHE=str(self.home / "gocache"),
        )
        return env

    async def download(self, goproxy: str) -> _Run:
        """Time one ``go mod download`` against ``goproxy``.

        Raises:
            RuntimeError: go failed (its output is in the message).
        """
        self.runs += 1
        modcache = self.home / f"modcache-{self.runs}"
        before = _requests_logged(self.static_log)
        t0 = time.perf_counter()
        with trio.fail_after(GO_TIMEOUT_S):
            done = await trio.run_process(
                [self.go, "mod", "download"],
                env=self.env(goproxy, modcache),
                cwd=self.app,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        seconds = time.perf_counter() - t0
        await trio.to_thread.run_sync(_rmtree, modcache)
        if done.returncode != 0:
            raise RuntimeError(
                f"go mod download via {goproxy} exited {done.returncode}:\n"
                + done.stderr.decode(errors="replace")[-2000:]
            )
        await trio.sleep(0.05)  # the static server logs after answering
        return _Run(seconds=seconds, upstream=_requests_logged(self.static_log) - before)


def _proxy(bench: Bench, name: str, upstream_port: int, rep: int) -> tuple[Managed, str] | None:
    """A fresh caching proxy in front of the tree, and the GOPROXY URL through it."""
    sizes = targets.CacheSizes()
    home = f"gomod-{name}-{rep}"
    if name == "nginx":
        managed = targets.nginx(bench.tmp, upstream_port, sizes, bench.nginx_workers, name=home)
        return None if managed is None else (managed, f"http://127.0.0.1:{managed.port}/")
    managed = targets.proxychain(
        bench.tmp,
        upstream_port,
        sizes,
        bench.proxy_workers,
        name=home,
        prefix="/go/",
        kind="goproxy",
    )
    return managed, f"http://127.0.0.1:{managed.port}/go/"


async def gomod(bench: Bench) -> list[Row]:
    """Cold and warm ``go mod download`` direct, through proxychain and through nginx."""
    go = shutil.which("go")
    if go is None:
        print("gomod: skipped, go is not installed (run: bash bench/setup.sh)", file=sys.stderr)
        return []
    modules = QUICK_SET if bench.quick else FULL_SET
    builder = _gomod_builder()
    missing = [m.package for m in modules if not (builder.GOCODE / m.path).is_dir()]
    if missing:
        print(
            f"gomod: skipped, module sources missing: {' '.join(missing)} "
            "(run: bash bench/setup.sh)",
            file=sys.stderr,
        )
        return []
    home = bench.tmp / "gomod"
    tree, app = home / "tree", home / "app"
    await trio.to_thread.run_sync(_build, tree, app, modules)
    static = targets.static_files(bench.tmp, tree, name="gomod-static")
    await static.start()
    zips = sum(p.stat().st_size for p in tree.rglob("*.zip"))
    runner = _Go(go, home, app, static.log)
    names = [n for n in PROXIES if n in bench.caches]
    times: dict[str, list[float]] = {"direct": []}
    upstream: dict[str, list[int]] = {"direct": []}
    reps = 1 if bench.quick else bench.gomod_runs
    try:
        for rep in range(reps):
            direct = await runner.download(f"http://127.0.0.1:{static.port}/")
            times["direct"].append(direct.seconds)
            upstream["direct"].append(direct.upstream)
            for name in names:
                made = _proxy(bench, name, static.port, rep)
                if made is None:
                    continue
                proxy, url = made
                try:
                    await proxy.start()
                except StartError as exc:
                    print(f"gomod: {name} did not start:\n{exc}", file=sys.stderr)
                    continue
                try:
                    for phase in ("cold", "warm"):
                        run = await runner.download(url)
                        times.setdefault(f"{name} {phase}", []).append(run.seconds)
                        upstream.setdefault(f"{name} {phase}", []).append(run.upstream)
                finally:
                    proxy.stop()
    finally:
        static.stop()
    bench.raw["gomod"] = {"seconds": times, "upstream_requests": upstream, "zip_bytes": zips}

    def med(key: str) -> float | str:
        values = times.get(key)
        return round(statistics.median(values), 3) if values else "-"

    def ups(key: str) -> float | str:
        values = upstream.get(key)
        return max(values) if values else "-"

    scen = (
        f"gomod: go mod download, {len(modules)} modules, {zips / 2**20:.1f} MiB of zips, "
        f"median of {reps}"
    )
    return [
        Row(
            scenario=scen,
            metric="cold s (proxy cache empty)",
            values={"origin": med("direct"), **{n: med(f"{n} cold") for n in names}},
            better="lower",
        ),
        Row(
            scenario=scen,
            metric="warm s (proxy cache filled)",
            values={"origin": med("direct"), **{n: med(f"{n} warm") for n in names}},
            better="lower",
        ),
        Row(
            scenario=scen,
            metric="upstream requests, cold",
            values={"origin": ups("direct"), **{n: ups(f"{n} cold") for n in names}},
        ),
        Row(
            scenario=scen,
            metric="upstream requests, warm",
            values={"origin": ups("direct"), **{n: ups(f"{n} warm") for n in names}},
        ),
    ]
