"""``pip install`` through proxychain against pypiserver serving real wheels."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunningProxy, make_settings
from tests.e2e.tools import (
    WHEELS_DIR,
    Server,
    clean_env,
    pypiserver,
    run,
    running_proxy,
    static_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.loopback]

PROJECTS = ("six", "iniconfig")
# Per pip run: one index page and one wheel per project.
PIP_REQUESTS_PER_RUN = 2 * len(PROJECTS)


@dataclass
class PipWorld:
    tmp: Path
    upstream: Server
    proxy: RunningProxy
    prefix: str
    runs: int = 0

    async def install(self, *projects: str) -> list[str]:
        """pip install into a fresh target; returns the URLs pip downloaded from."""
        self.runs += 1
        report = self.tmp / f"report-{self.runs}.json"
        env = clean_env(
            self.tmp,
            PIP_CONFIG_FILE="/dev/null",
            PIP_NO_INPUT="1",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        argv = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--isolated"]
        argv += ["--disable-pip-version-check", "--no-input"]
        argv += ["--index-url", f"{self.proxy.url}{self.prefix}simple/", "--only-binary", ":all:"]
        argv += ["--retries", "0", "--timeout", "10", "--report", str(report)]
        argv += ["--target", str(self.tmp / f"site-{self.runs}"), *(projects or PROJECTS)]
        await run(argv, env=env, cwd=self.tmp)
        installed = json.loads(report.read_text())["install"]
        return sorted(item["download_info"]["url"] for item in installed)

    def figures(self) -> tuple[int, int]:
        route = self.proxy.proxy.observer.routes[self.prefix]
        return route.requests, route.hits


def wheels() -> list[Path]:
    found = sorted(WHEELS_DIR.glob("*.whl")) if WHEELS_DIR.is_dir() else []
    if len(found) < len(PROJECTS):
        pytest.skip(f"wheels missing in {WHEELS_DIR} (run .ci/e2e-setup)")
    return found


@pytest.fixture
async def pypi_upstream(tmp_path: Path) -> AsyncIterator[Server]:
    wheels()
    server = pypiserver(WHEELS_DIR, log=tmp_path / "pypiserver.log", home=tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_pip_install_cold_warm_and_upstream_stopped(
    tmp_path: Path, pypi_upstream: Server
) -> None:
    # At prefix "/" pypiserver's root-relative links (/packages/...) stay on the route, so
    # this runs without link rewriting.
    routes = [{"prefix": "/", "kind": "pypi", "upstreams": pypi_upstream.url, "retries": 0}]
    settings = make_settings(tmp_path / "cache", routes, log={"access_log": False})
    async with running_proxy(settings) as proxy:
        world = PipWorld(tmp_path, pypi_upstream, proxy, "/")
        expected = sorted(f"{proxy.url}/packages/{w.name}" for w in wheels())
        assert await world.install() == expected
        assert world.figures() == (PIP_REQUESTS_PER_RUN, 0)

        # pip sends "Cache-Control: max-age=0" for index pages, so they are revalidated
        # (pypiserver sends no validators: refetched, a MISS); the wheels are hits.
        assert await world.install() == expected
        assert world.figures() == (2 * PIP_REQUESTS_PER_RUN, len(PROJECTS))

        # Upstream gone: the index pages are served stale (stale-if-error), wheels hit.
        await pypi_upstream.stop()
        assert await world.install() == expected
        assert world.figures() == (3 * PIP_REQUESTS_PER_RUN, len(PROJECTS) + PIP_REQUESTS_PER_RUN)


async def test_pip_install_under_a_route_prefix(tmp_path: Path, pypi_upstream: Server) -> None:
    routes = [{"prefix": "/pypi/", "kind": "pypi", "upstreams": pypi_upstream.url, "retries": 0}]
    settings = make_settings(tmp_path / "cache", routes, log={"access_log": False})
    async with running_proxy(settings) as proxy:
        world = PipWorld(tmp_path, pypi_upstream, proxy, "/pypi/")
        expected = sorted(f"{proxy.url}/pypi/packages/{w.name}" for w in wheels())
        assert await world.install() == expected
        await pypi_upstream.stop()
        assert await world.install() == expected
        assert world.figures() == (2 * PIP_REQUESTS_PER_RUN, PIP_REQUESTS_PER_RUN)


def tampered_index(root: Path, wheel: Path) -> None:
    """A static PyPI upstream whose page announces ``wheel``'s real sha256 but whose file
    bytes were altered (a compromised mirror)."""
    project = wheel.name.split("-", 1)[0].lower()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = root / "simple" / project
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<a href="/packages/{wheel.name}#sha256={digest}">{wheel.name}</a>\n'
    )
    (root / "packages").mkdir()
    (root / "packages" / wheel.name).write_bytes(wheel.read_bytes() + b"tampered")


async def test_tampered_wheel_is_refused_and_the_next_upstream_serves(
    tmp_path: Path, pypi_upstream: Server
) -> None:
    six = next(w for w in wheels() if w.name.startswith("six-"))
    tampered_index(tmp_path / "bad", six)
    bad = await static_server(tmp_path / "bad", log=tmp_path / "bad.log", home=tmp_path).start()
    try:
        # "|": any failure of the first upstream, an integrity failure included, moves on.
        upstreams = f"{bad.url}|{pypi_upstream.url}"
        routes = [{"prefix": "/pypi/", "kind": "pypi", "upstreams": upstreams, "retries": 0}]
        settings = make_settings(tmp_path / "cache", routes, log={"access_log": False})
        async with running_proxy(settings) as proxy:
            world = PipWorld(tmp_path, pypi_upstream, proxy, "/pypi/")
            assert await world.install("six") == [f"{proxy.url}/pypi/packages/{six.name}"]
            installed = tmp_path / "site-1" / "six.py"
            assert installed.read_bytes() == _member(six, "six.py")
            assert _integrity_failures(proxy) == 1
    finally:
        await bad.stop()


def _member(wheel: Path, name: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name)


def _integrity_failures(proxy: RunningProxy) -> float:
    body, _ = proxy.proxy.metrics()
    for line in body.decode().splitlines():
        if line.startswith("proxychain_integrity_failures_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
