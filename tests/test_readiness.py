"""Readiness of the data plane as ``/readyz`` reports it."""

from __future__ import annotations

from pathlib import Path

from proxychain.proxy import open_proxy
from tests.conftest import make_settings, run_proxy


async def test_not_ready_until_listening(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "cache", [{"prefix": "/", "upstreams": "http://a.test"}])
    async with open_proxy(settings) as proxy:
        assert proxy.ready() == (False, ["the data-plane listener is not accepting connections"])
    async with run_proxy(settings) as running:
        assert running.proxy.ready() == (True, [])
