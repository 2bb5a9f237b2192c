"""Lockfile parsing for ``proxychain warm``: kinds, items and index-page file selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxychain.lockfiles import (
    LockfileError,
    PyRequirement,
    WarmItem,
    detect_kind,
    parse_go_sum,
    parse_package_lock,
    parse_pylock,
    parse_requirements,
    select_files,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


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
