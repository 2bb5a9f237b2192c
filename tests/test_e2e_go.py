"""``go mod download`` + ``go build`` through proxychain against a real module proxy tree.

The tree is built from Debian's module sources; the app's ``go.sum`` is hashed by proxychain's
own dirhash, so ``go`` checking it also checks ``goproxy.zip_hash``/``mod_hash``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunningProxy, make_settings
from tests.e2e import gomod
from tests.e2e.tools import Server, clean_env, require, run, running_proxy, static_server

pytestmark = [pytest.mark.e2e, pytest.mark.loopback]

APP_GO_MOD = """module example.com/app

go 1.19

require (
\tgithub.com/pkg/errors v0.9.1
\tgolang.org/x/sync v0.1.0
)
"""
APP_MAIN = """package main

import (
\t"fmt"

\t"github.com/pkg/errors"
\t"golang.org/x/sync/errgroup"
)

func main() {
\tvar g errgroup.Group
\tg.Go(func() error { return errors.New("through proxychain") })
\tfmt.Println(g.Wait())
}
"""
APP_OUTPUT = b"through proxychain\n"
# What `go mod download` + `go build` ask for: .info, .mod and .zip of both modules.
GO_FILES_PER_RUN = 6


@dataclass
class GoWorld:
    """An upstream module proxy, proxychain in front of it, and an app to build."""

    tmp: Path
    upstream: Server
    proxy: RunningProxy
    app: Path
    gocache: Path
    runs: int = 0

    def env(self) -> dict[str, str]:
        self.runs += 1
        go_env = {
            "GOPROXY": f"{self.proxy.url}/go/",
            "GOSUMDB": "off",
            "GOFLAGS": "-mod=mod",
            "GONOSUMDB": "",
            "GOPRIVATE": "",
            "GOENV": "off",
            "GO111MODULE": "on",
            "CGO_ENABLED": "0",
            "GOPATH": str(self.tmp / "gopath"),
            # A fresh module cache per run: every run must fetch through the proxy again.
            "GOMODCACHE": str(self.tmp / f"modcache-{self.runs}"),
            "GOCACHE": str(self.gocache),
        }
        return clean_env(self.tmp, **go_env)

    async def build(self) -> None:
        """go mod download + go build + run the binary."""
        go = require("go")
        env = self.env()
        await run([go, "mod", "download", "-x"], env=env, cwd=self.app)
        await run([go, "build", "-o", "app", "."], env=env, cwd=self.app)
        result = await run([str(self.app / "app")], env=env, cwd=self.app)
        assert result.stdout == APP_OUTPUT
        # The read-only module cache would make pytest's tmp_path cleanup fail.
        await run([go, "clean", "-modcache"], env=env, cwd=self.app)

    def figures(self) -> tuple[int, int]:
        route = self.proxy.proxy.observer.routes["/go/"]
        return route.requests, route.hits


def write_app(app: Path, *, go_sum: bool = True) -> None:
    app.mkdir(parents=True, exist_ok=True)
    (app / "go.mod").write_text(APP_GO_MOD)
    (app / "main.go").write_text(APP_MAIN)
    if go_sum:
        (app / "go.sum").write_text("\n".join(gomod.go_sum_lines()) + "\n")


@pytest.fixture(scope="session")
def gocache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build cache, shared: compiling the standard library once is enough."""
    return tmp_path_factory.mktemp("gocache")


@pytest.fixture
async def go_world(tmp_path: Path, gocache: Path) -> AsyncIterator[GoWorld]:
    require("go")
    missing = [m.path for m in gomod.MODULES if not m.source.is_dir()]
    if missing:
        pytest.skip(f"module sources missing: {missing} (run .ci/e2e-setup)")
    tree = tmp_path / "goproxy-tree"
    gomod.build_tree(tree)
    upstream = await static_server(tree, log=tmp_path / "upstream.log", home=tmp_path).start()
    routes = [{"prefix": "/go/", "kind": "goproxy", "upstreams": upstream.url, "retries": 0}]
    settings = make_settings(tmp_path / "cache", routes, log={"access_log": False})
    try:
        async with running_proxy(settings) as proxy:
            app = tmp_path / "app"
            write_app(app)
            yield GoWorld(tmp_path, upstream, proxy, app, gocache)
    finally:
        await upstream.stop()


async def test_go_build_cold_warm_and_upstream_stopped(go_world: GoWorld) -> None:
    await go_world.build()
    cold = go_world.figures()
    assert cold == (GO_FILES_PER_RUN, 0)

    await go_world.build()
    warm = go_world.figures()
    assert (warm[0] - cold[0], warm[1] - cold[1]) == (GO_FILES_PER_RUN, GO_FILES_PER_RUN)

    await go_world.upstream.stop()
    await go_world.build()
    stopped = go_world.figures()
    assert (stopped[0] - warm[0], stopped[1] - warm[1]) == (GO_FILES_PER_RUN, GO_FILES_PER_RUN)


async def test_go_without_go_sum_records_proxychain_hashes(go_world: GoWorld) -> None:
    """go writes go.sum itself from what came through the proxy: the same hashes as ours."""
    (go_world.app / "go.sum").unlink()
    go = require("go")
    env = go_world.env()
    await run([go, "build", "-o", "app", "."], env=env, cwd=go_world.app)
    written = sorted((go_world.app / "go.sum").read_text().splitlines())
    await run([go, "clean", "-modcache"], env=env, cwd=go_world.app)
    assert written == sorted(gomod.go_sum_lines())
