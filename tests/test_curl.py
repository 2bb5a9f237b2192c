"""Wire-level checks with a real client: curl against the proxy on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from tests.conftest import ProxyFactory
from tests.fakes import FakeOrigin, Reply, ok, serve_origin

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


async def _curl(*args: str) -> tuple[int, str, bytes]:
    result = await trio.run_process(
        ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "20", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stderr.decode(errors="replace"), result.stdout


async def test_curl_miss_then_hit_with_headers(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/pkg.tgz", ok(b"x" * 5000, ("cache-control", "max-age=600")))
    async with serve_origin(origin) as up, proxy_factory([{"prefix": "/", "upstreams": up}]) as p:
        first = await _curl("-i", f"{p.url}/pkg.tgz")
        await p.settled()  # the miss's commit runs after its response
        second = await _curl("-i", f"{p.url}/pkg.tgz")
    for code, _, _ in (first, second):
        assert code == 0
    head1 = first[2].split(b"\r\n\r\n", 1)[0].decode().lower()
    head2, body2 = second[2].split(b"\r\n\r\n", 1)
    assert head1.startswith("http/1.1 200 ok")
    assert "x-cache: miss" in head1
    assert "x-cache: hit" in head2.decode().lower()
    assert "x-cache-tier: memory" in head2.decode().lower()
    assert body2 == b"x" * 5000
    assert origin.count("/pkg.tgz") == 1


async def test_curl_post_with_expect_100_continue(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    payload = os.urandom(300_000)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    origin = FakeOrigin()
    origin.set("/upload", Reply(status=201, body=b"stored"))
    async with serve_origin(origin) as up, proxy_factory([{"prefix": "/", "upstreams": up}]) as p:
        code, stderr, body = await _curl(
            "-v",
            "--expect100-timeout",
            "10",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{upload}",
            f"{p.url}/upload",
        )
    assert code == 0, stderr
    assert "HTTP/1.1 100 Continue" in stderr
    assert body == b"stored"
    assert origin.last_body == payload


@pytest.mark.parametrize("preserve", [False, True])
async def test_host_kept_or_rewritten_per_route(
    proxy_factory: ProxyFactory, preserve: bool
) -> None:
    origin = FakeOrigin()
    origin.set("/h", Reply(body=b"ok", headers=[("cache-control", "no-store")]))
    async with serve_origin(origin) as up:
        route = {"prefix": "/", "upstreams": up, "preserve_host": preserve}
        async with proxy_factory([route]) as p:
            code, stderr, _ = await _curl("-H", "Host: packages.example", f"{p.url}/h")
    assert code == 0, stderr
    sent = origin.requests[-1].headers
    expected = "packages.example" if preserve else up.removeprefix("http://")
    assert sent.get("host") == expected
    assert sent.get("x-forwarded-host") == "packages.example"
