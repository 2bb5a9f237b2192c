"""Purges reach every worker's memory tier through the shared purge log."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from proxychain.purgelog import PURGE_POLL_INTERVAL, Purge, PurgeLog
from tests.conftest import make_settings, run_proxy
from tests.fakes import FakeOrigin, ok, serve_origin

pytestmark = pytest.mark.loopback


async def test_purge_log_round_trip(tmp_path: Path) -> None:
    writer, reader = PurgeLog(tmp_path), PurgeLog(tmp_path)
    await writer.append(Purge(url="/old"))
    await reader.open()  # follows from the end: "/old" predates it
    await writer.append(Purge(url="/a/x"))
    await writer.append(Purge(prefix="/b/"))
    with open(tmp_path / "purge.log", "ab") as f:
        f.write(b'not json\n{"url": "/half')  # garbage, then a line still being written
    assert await reader.read_new() == [Purge(url="/a/x"), Purge(prefix="/b/")]
    with open(tmp_path / "purge.log", "ab") as f:
        f.write(b'"}\n')
    assert await reader.read_new() == [Purge(url="/half")]
    assert await reader.read_new() == []


@pytest.mark.parametrize("how", ["url", "prefix"])
async def test_purge_in_one_worker_clears_the_others_memory(tmp_path: Path, how: str) -> None:
    origin = FakeOrigin()
    origin.set("/f/doc", ok(b"v1", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as upstream:
        routes = [{"prefix": "/", "upstreams": upstream}]
        settings = make_settings(tmp_path / "cache", routes, server={"workers": 2})
        async with run_proxy(settings) as a, run_proxy(settings) as b:
            async with httpx.AsyncClient() as client:
                await client.get(f"{a.url}/f/doc")
                await a.settled()  # the miss's commit runs after its response
                for p in (a, b):  # both memory tiers hold it
                    await client.get(f"{p.url}/f/doc")
                    hit = await client.get(f"{p.url}/f/doc")
                    assert (hit.headers["x-cache"], hit.headers["x-cache-tier"]) == (
                        "HIT",
                        "memory",
                    )
                if how == "url":
                    assert await a.proxy.purge(url="/f/doc") == 1
                else:
                    assert await a.proxy.purge(prefix="/f/") == 1
                await trio.sleep(PURGE_POLL_INTERVAL * 1.5)
                after = await client.get(f"{b.url}/f/doc")
    assert after.headers["x-cache"] == "MISS"
    assert origin.count("/f/doc") == 2
