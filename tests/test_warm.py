"""``proxychain warm``: lockfile parsing (tables) and warming real upstreams' files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from proxychain.__main__ import main as cli_main
from proxychain.warm import (
    LockfileError,
    Prefixes,
    PyRequirement,
    WarmItem,
    detect_kind,
    parse_go_sum,
    parse_package_lock,
    parse_pylock,
    parse_requirements,
    select_files,
    warm,
)
from tests.conftest import make_settings
from tests.e2e import gomod
from tests.e2e.tools import Server, running_proxy
from tests.test_e2e_go import GO_FILES_PER_RUN, GoWorld, go_world, gocache, write_app  # noqa: F401  (fixtures)
from tests.test_e2e_npm import NpmWorld, npm_world  # noqa: F401  (fixture)
from tests.test_e2e_pip import PipWorld, pypi_upstream, wheels  # noqa: F401  (fixture)

SHA_A, SHA_B = "a" * 64, "b" * 64

# ---- lockfile parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("go.sum", "go"),
        ("package-lock.json", "npm"),
        ("npm-shrinkwrap.json", "npm"),
        ("pylock.toml", "pylock"),
        ("pylock.dev.toml", "pylock"),
        ("requirements-dev.txt", "requirements"),
    ],
)
def test_detect_kind(name: str, kind: str) -> None:
    assert detect_kind(Path("x") / name) == kind


def test_detect_kind_refuses_unknown_names() -> None:
    with pytest.raises(LockfileError):
        detect_kind(Path("yarn.lock"))


def test_parse_go_sum() -> None:
    text = (
        "github.com/BurntSushi/toml v1.2.0 h1:Z1=\n"
        "github.com/BurntSushi/toml v1.2.0/go.mod h1:M1=\n"
        "\n"
        "golang.org/x/mod v0.8.0/go.mod h1:M2=\n"
    )
    base = "/github.com/!burnt!sushi/toml/@v/v1.2.0"
    gz = "gzip"
    assert parse_go_sum(text, "/go/") == [
        WarmItem(target="/go" + base + ".info", accept_encoding=gz),
        WarmItem(
            target="/go" + base + ".zip",
            expected="h1:Z1=",
            key_path=base + ".zip",
            accept_encoding=gz,
        ),
        WarmItem(
            target="/go" + base + ".mod",
            expected="h1:M1=",
            key_path=base + ".mod",
            accept_encoding=gz,
        ),
        WarmItem(
            target="/go/golang.org/x/mod/@v/v0.8.0.mod",
            expected="h1:M2=",
            key_path="/golang.org/x/mod/@v/v0.8.0.mod",
            accept_encoding=gz,
        ),
    ]
    with pytest.raises(LockfileError, match=r"go\.sum line 1"):
        parse_go_sum("only two\n", "/go/")


def test_parse_requirements_with_hashes() -> None:
    text = (
        "# pip-compile --generate-hashes\n"
        "--index-url https://example.invalid/simple\n"
        f"Six==1.17.0 \\\n    --hash=sha256:{SHA_A.upper()} \\\n    --hash=sha256:{SHA_B}\n"
        f"requests[socks]==2.32.3 ; python_version >= '3.8' --hash=sha256:{SHA_A}  # via x\n"
    )
    assert parse_requirements(text) == [
        PyRequirement(
            name="six", version="1.17.0", hashes=frozenset({f"sha256:{SHA_A}", f"sha256:{SHA_B}"})
        ),
        PyRequirement(name="requests", version="2.32.3", hashes=frozenset({f"sha256:{SHA_A}"})),
    ]


@pytest.mark.parametrize(
    "line", ["six>=1.0 --hash=sha256:" + "a" * 64, "six==1.17.0", "./local/path"]
)
def test_parse_requirements_refuses_unpinned_or_unhashed(line: str) -> None:
    with pytest.raises(LockfileError):
        parse_requirements(line + "\n")


def test_parse_pylock() -> None:
    text = f"""
lock-version = "1.0"
[[packages]]
name = "Six"
version = "1.17.0"
wheels = [{{url = "https://f.example/six.whl", hashes = {{sha256 = "{SHA_A}"}}}}]
sdist = {{url = "https://f.example/six.tar.gz", hashes = {{sha256 = "{SHA_B}"}}}}
[[packages]]
name = "local"
directory = {{path = "."}}
"""
    assert parse_pylock(text) == [
        PyRequirement(
            name="six", version="1.17.0", hashes=frozenset({f"sha256:{SHA_A}", f"sha256:{SHA_B}"})
        )
    ]


def test_parse_package_lock_v3_and_v1() -> None:
    v3 = {
        "lockfileVersion": 3,
        "packages": {
            "": {"name": "app"},
            "node_modules/a": {
                "resolved": "https://registry.example/a/-/a-1.0.0.tgz",
                "integrity": "sha512-AA==",
            },
            "node_modules/@s/b": {"resolved": "http://127.0.0.1:8080/npm/@s/b/-/b-2.0.0.tgz"},
            "node_modules/linked": {"resolved": "file:../linked", "link": True},
        },
    }
    assert parse_package_lock(json.dumps(v3), "/npm/") == [
        WarmItem(
            target="/npm/a/-/a-1.0.0.tgz",
            expected="sha512-AA==",
            key_path="/a/-/a-1.0.0.tgz",
            accept_encoding="gzip,deflate",
        ),
        WarmItem(
            target="/npm/@s/b/-/b-2.0.0.tgz",
            key_path="/@s/b/-/b-2.0.0.tgz",
            accept_encoding="gzip,deflate",
        ),
    ]
    v1 = {
        "lockfileVersion": 1,
        "dependencies": {
            "a": {
                "resolved": "https://registry.example/a/-/a-1.0.0.tgz",
                "dependencies": {"c": {"resolved": "https://registry.example/c/-/c-3.0.0.tgz"}},
            }
        },
    }
    assert [i.target for i in parse_package_lock(json.dumps(v1), "/npm/")] == [
        "/npm/a/-/a-1.0.0.tgz",
        "/npm/c/-/c-3.0.0.tgz",
    ]


@pytest.mark.parametrize(
    ("content_type", "page"),
    [
        (
            "application/vnd.pypi.simple.v1+json",
            json.dumps(
                {
                    "files": [
                        {"url": "../../packages/six.whl", "hashes": {"sha256": SHA_A.upper()}},
                        {"url": "/packages/other.whl", "hashes": {"sha256": SHA_B}},
                    ]
                }
            ).encode(),
        ),
        (
            "text/html",
            f'<a href="../../packages/six.whl#sha256={SHA_A}">six</a>'
            f'<a href="/packages/other.whl#sha256={SHA_B}">o</a>'.encode(),
        ),
    ],
)
def test_select_files_by_locked_hash(content_type: str, page: bytes) -> None:
    requirement = PyRequirement(name="six", version="1", hashes=frozenset({f"sha256:{SHA_A}"}))
    page_url = "http://p:1/pypi/simple/six/"
    assert select_files(page, content_type, page_url, requirement) == [
        ("http://p:1/pypi/packages/six.whl", f"sha256:{SHA_A}")
    ]


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
