"""``proxychain warm``: the command line, and warming real upstreams' files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxychain.__main__ import main as cli_main
from proxychain.warm import Prefixes, warm
from tests.conftest import make_settings
from tests.e2e import gomod
from tests.e2e.tools import Server, running_proxy
from tests.test_e2e_go import GO_FILES_PER_RUN, GoWorld, go_world, gocache, write_app  # noqa: F401  (fixtures)
from tests.test_e2e_npm import NpmWorld, npm_world  # noqa: F401  (fixture)
from tests.test_e2e_pip import PipWorld, pypi_upstream, wheels  # noqa: F401  (fixture)


def test_warm_command_refuses_unknown_lockfiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "Pipfile.lock").write_text("{}")
    assert cli_main(["warm", "--no-progress", str(tmp_path / "Pipfile.lock")]) == 2
    assert "unknown lockfile kind" in capsys.readouterr().err


# ---- warming real upstreams, then building with the upstream stopped --------------------------


@pytest.mark.e2e
@pytest.mark.loopback
async def test_warm_go_sum_then_build_offline(go_world: GoWorld, tmp_path: Path) -> None:  # noqa: F811
    go_sum = tmp_path / "go.sum"
    go_sum.write_text("\n".join(gomod.go_sum_lines()) + "\n")
    report = await warm([go_sum], proxy=go_world.proxy.url, concurrency=3)
    assert (report.fetched, report.hits, report.failed) == (GO_FILES_PER_RUN, 0, [])
    await go_world.upstream.stop()
    await go_world.build()
    assert go_world.figures() == (2 * GO_FILES_PER_RUN, GO_FILES_PER_RUN)


@pytest.mark.e2e
@pytest.mark.loopback
async def test_warm_reports_digest_mismatch_and_missing_files(
    go_world: GoWorld,  # noqa: F811
    tmp_path: Path,
) -> None:
    lines = gomod.go_sum_lines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " h1:" + "A" * 43 + "="  # a wrong zip hash
    lines.append("example.com/missing v1.0.0/go.mod h1:x=")
    go_sum = tmp_path / "go.sum"
    go_sum.write_text("\n".join(lines) + "\n")
    report = await warm([go_sum], proxy=go_world.proxy.url)
    assert sorted(report.failed) == [
        ("/go/example.com/missing/@v/v1.0.0.mod", "answered 404"),
        (
            "/go/github.com/pkg/errors/@v/v0.9.1.zip",
            "body does not match h1:" + "A" * 43 + "=",
        ),
    ]
    assert report.summary().splitlines()[0].endswith("2 failed")


@pytest.mark.e2e
@pytest.mark.loopback
async def test_warm_requirements_and_pylock_then_pip_offline(
    tmp_path: Path,
    pypi_upstream: Server,  # noqa: F811
) -> None:
    found = wheels()
    digests = {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in found}
    six = next(w for w in found if w.name.startswith("six-"))
    ini = next(w for w in found if w.name.startswith("iniconfig-"))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"six==1.17.0 --hash=sha256:{digests[six.name]}\n")
    pylock = tmp_path / "pylock.toml"
    pylock.write_text(
        '[[packages]]\nname = "iniconfig"\nversion = "2.0.0"\n'
        f'wheels = [{{url = "https://elsewhere.example/{ini.name}", '
        f'hashes = {{sha256 = "{digests[ini.name]}"}}}}]\n'
    )
    routes = [{"prefix": "/", "kind": "pypi", "upstreams": pypi_upstream.url, "retries": 0}]
    settings = make_settings(tmp_path / "cache", routes, log={"access_log": False})
    async with running_proxy(settings) as proxy:
        report = await warm([requirements, pylock], proxy=proxy.url, prefixes=Prefixes(pypi="/"))
        assert (report.fetched, report.failed) == (2, [])
        await pypi_upstream.stop()
        world = PipWorld(tmp_path, pypi_upstream, proxy, "/")
        assert await world.install() == sorted(f"{proxy.url}/packages/{w.name}" for w in found)


@pytest.mark.e2e
@pytest.mark.loopback
async def test_warm_package_lock_then_npm_ci_offline(npm_world: NpmWorld) -> None:  # noqa: F811
    resolved = await npm_world.install()
    lockfile = npm_world.tmp / "app" / "package-lock.json"
    assert await npm_world.proxy.proxy.purge(prefix="/npm/") == 4
    report = await warm([lockfile], proxy=npm_world.proxy.url)
    assert (report.fetched, report.hits, report.failed) == (2, 0, [])
    await npm_world.upstream.stop()
    assert await npm_world.install("ci") == resolved
