"""The command line, run as a user runs it: a subprocess, real signals, real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.fakes import FakeOrigin, ok, serve_origin

pytestmark = pytest.mark.loopback


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxychain", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_check_config_prints_effective_settings(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:3128"\n'
        '[[route]]\nprefix = "/go/"\nupstreams = "https://a.example,https://b.example"\n'
    )
    result = _cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["server"]["port"] == 3128
    assert settings["routes"][0]["upstreams"] == "https://a.example,https://b.example"
    assert settings["routes"][0]["breaker"]["failures"] == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[cache]\nmemory_max = 'huge'\n", "cache.memory_max: expected a size"),
        ("[[route]]\nprefix = '/x/'\nupstreams = 'direct'\n", "route[0].upstreams"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for command in (["check-config", str(config)], ["serve", "--config", str(config)]):
        result = _cli(*command)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(config) in lines[0]
        assert expected in lines[0]


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = _cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "no such file" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_caches_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    origin = FakeOrigin()
    origin.set("/f.txt", ok(b"payload\n", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as upstream:
        port = _free_port()
        config = tmp_path / "p.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[cache]\ndir = "{tmp_path / "cache"}"\n'
            '[admin]\nlisten = ""\n'
            f'[[route]]\nprefix = "/files/"\nupstreams = "{upstream}"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxychain", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            url = f"http://127.0.0.1:{port}/files/f.txt"
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        first = await client.get(url)
                        break
                    except httpx.ConnectError:
                        if time.monotonic() > deadline:
                            raise
                        await trio.sleep(0.05)
                second = await client.get(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    access = [line for line in stderr.splitlines() if "proxychain.access" in line]
    assert len(access) == 2
    assert '"GET /files/f.txt" 200 8' in access[0]
    assert "cache=MISS" in access[0]
    # From memory, or from the fill's file while the miss's commit still runs.
    assert re.search(r"cache=HIT tier=(memory|fill) ", access[1]), access[1]
    assert "received SIGTERM" in stderr
    assert "stopped" in stderr
    assert origin.count("/f.txt") == 1
