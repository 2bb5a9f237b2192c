"""Config parsing: sizes, durations, the TOML contract, and errors that name file and key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from proxychain.configfile import default_settings, load_settings, parse_settings
from proxychain.errors import ConfigError
from proxychain.settings import parse_duration, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, 1048576),
        ("512", 512),
        ("512B", 512),
        ("1KiB", 1024),
        ("256MiB", 256 * 1024**2),
        ("20GiB", 20 * 1024**3),
        ("20 GiB", 20 * 1024**3),
        ("1kb", 1000),
        ("3MB", 3_000_000),
        ("2M", 2 * 1024**2),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "12XB", "-1", -1, "1.5GiB", True, None, "GiB"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (0.5, 0.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(value: object, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["", "soon", "10", "10x", "s", "1h 30", -3, True])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_contract_shape() -> None:
    settings = parse_settings(
        {
            "server": {"listen": "0.0.0.0:3128"},
            "cache": {"dir": "/var/cache/x", "memory_max": "64MiB", "disk_max": "1GiB"},
            "route": [
                {
                    "prefix": "/go/",
                    "upstreams": "https://proxy.golang.org,https://goproxy.cn",
                    "breaker": {"failures": 3, "open_base": "2s", "open_cap": "30s"},
                }
            ],
            "admin": {"listen": "127.0.0.1:9999", "token": "secret"},
        },
        source="edge.toml",
    )
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 3128)
    assert settings.cache.dir == Path("/var/cache/x")
    assert (settings.cache.memory_max, settings.cache.disk_max) == (64 * 1024**2, 1024**3)
    (route,) = settings.routes
    assert route.prefix == "/go/"
    assert route.upstreams == "https://proxy.golang.org,https://goproxy.cn"
    assert (route.breaker.failures, route.breaker.open_base, route.breaker.open_cap) == (
        3,
        2.0,
        30.0,
    )
    assert (settings.admin.port, settings.admin.token, settings.admin.enabled) == (
        9999,
        "secret",
        True,
    )


def test_admin_listen_empty_turns_it_off() -> None:
    settings = parse_settings({"admin": {"listen": ""}})
    assert settings.admin.enabled is False


def test_admin_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYCHAIN_ADMIN_TOKEN", "from-env")
    assert parse_settings({}).admin.token == "from-env"
    assert parse_settings({"admin": {"token": "from-file"}}).admin.token == "from-file"


def _route(**extra: Any) -> dict[str, Any]:
    return {"route": [{"prefix": "/a/", "upstreams": "http://127.0.0.1:1", **extra}]}


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"server": {"listen": "nowhere"}}, "server.listen", 'expected "host:port"'),
        ({"server": {"listen": "1.2.3.4:99999"}}, "server.listen", 'expected "host:port"'),
        ({"server": {"lisen": "x"}}, "server.lisen", "unknown key"),
        ({"cache": {"memory_max": "lots"}}, "cache.memory_max", "expected a size"),
        ({"cache": {"disk_max": []}}, "cache.disk_max", "expected a size"),
        (_route(upstreams="direct"), "route[0].upstreams", '"direct"'),
        (_route(upstreams="ftp://x"), "route[0].upstreams", "http:// or https://"),
        (_route(upstreams=""), "route[0].upstreams", "GOPROXY-style"),
        (_route(prefix="go"), "route[0].prefix", 'starts and ends with "/"'),
        (_route(kind="maven"), "route[0].kind", "expected one of"),
        (_route(breaker={"failures": -1}), "route[0].breaker.failures", "integer >= 0"),
        (_route(breaker={"open_base": "soon"}), "route[0].breaker.open_base", "duration"),
        (
            _route(breaker={"open_base": "10s", "open_cap": "1s"}),
            "route[0].breaker.open_cap",
            ">= open_base",
        ),
        (_route(timeouts={"connect": 0}), "route[0].timeouts.connect", "greater than zero"),
        (_route(health_path="health"), "route[0].health_path", 'starting with "/"'),
        (_route(private=[{"patterns": []}]), "route[0].private[0].patterns", "at least one"),
        ({"route": {"prefix": "/"}}, "route", "array of tables"),
        ({"log": {"level": "LOUD"}}, "log.level", "expected DEBUG"),
        ({"surprise": 1}, "surprise", "unknown key"),
    ],
)
def test_errors_name_file_key_and_expectation(
    data: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, source="edge.toml")
    message = str(info.value)
    assert message.startswith(f"edge.toml: {key}: "), message
    assert fragment in message


def test_duplicate_prefix_is_an_error() -> None:
    data = {
        "route": [
            {"prefix": "/a/", "upstreams": "http://127.0.0.1:1"},
            {"prefix": "/a/", "upstreams": "http://127.0.0.1:2"},
        ]
    }
    with pytest.raises(ConfigError, match=r"route\[1\]\.prefix: duplicate prefix"):
        parse_settings(data, source="x.toml")


def test_load_settings_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nlisten=1")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_settings(bad)


def test_default_settings_are_the_documented_edge_cache() -> None:
    settings = default_settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.cache.dir == Path("proxychain-cache")
    assert [(r.prefix, r.kind) for r in settings.routes] == [
        ("/go/", "goproxy"),
        ("/pypi/", "pypi"),
        ("/npm/", "npm"),
    ]


def test_example_configs_are_valid() -> None:
    config_dir = Path(__file__).resolve().parent.parent / "config"
    examples = sorted(config_dir.glob("*.toml"))
    for path in examples:
        load_settings(path)


def test_readme_configuration_reference_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert blocks, "the README lost its configuration reference"
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme-{i}.toml"
        path.write_text(block)
        load_settings(path)
