"""``npm install`` through proxychain against verdaccio (no uplinks, packages published to it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunningProxy, make_settings
from tests.e2e.tools import (
    Server,
    clean_env,
    npm_token,
    require,
    run,
    running_proxy,
    verdaccio,
)

pytestmark = [pytest.mark.e2e, pytest.mark.loopback]

# A scoped package depending on an unscoped one: both name shapes go through the route.
PACKAGES = {
    "pc-e2e-left": ("1.0.0", {}, "module.exports = 'left';\n"),
    "@pc-e2e/right": (
        "1.0.0",
        {"pc-e2e-left": "^1.0.0"},
        "module.exports = 'right+' + require('pc-e2e-left');\n",
    ),
}
APP = {"name": "app", "version": "1.0.0", "dependencies": {"@pc-e2e/right": "1.0.0"}}
# Per cold `npm install`: two packuments and two tarballs.
NPM_REQUESTS_COLD = 4


def write_package(root: Path, name: str) -> Path:
    version, deps, code = PACKAGES[name]
    directory = root / name.replace("/", "__")
    directory.mkdir(parents=True)
    manifest = {"name": name, "version": version, "main": "index.js", "dependencies": deps}
    (directory / "package.json").write_text(json.dumps(manifest))
    (directory / "index.js").write_text(code)
    return directory


@dataclass
class NpmWorld:
    tmp: Path
    upstream: Server
    proxy: RunningProxy
    runs: int = 0

    def argv(self, *args: str) -> list[str]:
        self.runs += 1
        user, global_ = self.tmp / "user-npmrc", self.tmp / "global-npmrc"
        user.touch()
        global_.touch()
        return [
            require("npm"),
            *args,
            "--registry",
            f"{self.proxy.url}/npm/",
            "--userconfig",
            str(user),
            "--globalconfig",
            str(global_),
            "--cache",
            str(self.tmp / f"npm-cache-{self.runs}"),
            "--fetch-retries",
            "0",
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
        ]

    async def install(self, command: str = "install") -> list[str]:
        """npm install (or ci) into a clean app dir; returns the lockfile's resolved URLs."""
        app = self.tmp / "app"
        app.mkdir(exist_ok=True)
        (app / "package.json").write_text(json.dumps(APP))
        for leftover in ("node_modules",):
            if (app / leftover).exists():
                await run(["rm", "-rf", str(app / leftover)], env=clean_env(self.tmp), cwd=app)
        await run(self.argv(command), env=clean_env(self.tmp), cwd=app)
        node = await run(
            [require("node"), "-p", "require('@pc-e2e/right')"], env=clean_env(self.tmp), cwd=app
        )
        assert node.stdout == b"right+left\n"
        lock = json.loads((app / "package-lock.json").read_text())
        return sorted(meta["resolved"] for name, meta in lock["packages"].items() if name)

    def figures(self) -> tuple[int, int]:
        route = self.proxy.proxy.observer.routes["/npm/"]
        return route.requests, route.hits


@pytest.fixture
async def npm_world(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[NpmWorld]:
    rewrite = bool(getattr(request, "param", False))
    require("npm")
    # Without rewriting, verdaccio itself must name the proxy in its tarball URLs: it builds
    # them from the Host header (forwarded by preserve_host) plus url_prefix.
    upstream = verdaccio(
        tmp_path / "verdaccio" / "storage",
        log=tmp_path / "verdaccio.log",
        home=tmp_path,
        url_prefix="" if rewrite else "/npm/",
    )
    await upstream.start()
    try:
        token = await npm_token(upstream.url)
        rc = tmp_path / "publish-npmrc"
        host = upstream.url.removeprefix("http:")
        rc.write_text(f"registry={upstream.url}/\n{host}/:_authToken={token}\n")
        for name in PACKAGES:
            directory = write_package(tmp_path / "src", name)
            (tmp_path / "global-npmrc").touch()
            argv = [require("npm"), "publish", "--userconfig", str(rc)]
            argv += ["--globalconfig", str(tmp_path / "global-npmrc")]
            await run(
                [*argv, "--registry", f"{upstream.url}/"], env=clean_env(tmp_path), cwd=directory
            )
        route = {"prefix": "/npm/", "kind": "npm", "upstreams": upstream.url, "retries": 0}
        if not rewrite:
            route["preserve_host"] = True
        settings = make_settings(tmp_path / "cache", [route], log={"access_log": False})
        async with running_proxy(settings) as proxy:
            yield NpmWorld(tmp_path, upstream, proxy)
    finally:
        await upstream.stop()


async def test_npm_install_cold_warm_and_upstream_stopped(npm_world: NpmWorld) -> None:
    proxied = npm_world.proxy.url + "/npm/"
    resolved = await npm_world.install()
    assert resolved == [
        f"{proxied}@pc-e2e/right/-/right-1.0.0.tgz",
        f"{proxied}pc-e2e-left/-/pc-e2e-left-1.0.0.tgz",
    ]
    assert npm_world.figures() == (NPM_REQUESTS_COLD, 0)
    # npm ci reads only the lockfile: the tarballs, both hits.
    assert await npm_world.install("ci") == resolved
    assert npm_world.figures() == (NPM_REQUESTS_COLD + 2, 2)
    await npm_world.upstream.stop()
    assert await npm_world.install("ci") == resolved
    assert npm_world.figures() == (NPM_REQUESTS_COLD + 4, 4)


@pytest.mark.parametrize("npm_world", [True], indirect=True, ids=["rewrite"])
async def test_npm_install_with_tarball_urls_rewritten(npm_world: NpmWorld) -> None:
    """No url_prefix, no preserve_host: only rewriting keeps npm on the proxy."""
    proxied = npm_world.proxy.url + "/npm/"
    resolved = await npm_world.install()
    assert resolved == [
        f"{proxied}@pc-e2e/right/-/right-1.0.0.tgz",
        f"{proxied}pc-e2e-left/-/pc-e2e-left-1.0.0.tgz",
    ]
    await npm_world.upstream.stop()
    assert await npm_world.install("ci") == resolved
