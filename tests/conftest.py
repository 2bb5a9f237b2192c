"""Shared fixtures: a proxy running on loopback in front of fake upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from proxychain.clock import Clock
from proxychain.configfile import parse_settings
from proxychain.listen import serve
from proxychain.proxy import Proxy, open_proxy
from proxychain.settings import Settings
from proxychain.upstream import Connector


@dataclass
class RunningProxy:
    """A proxy serving on 127.0.0.1."""

    url: str
    port: int
    proxy: Proxy
    settings: Settings
    shutdown: trio.Event

    async def settled(self) -> None:
        """Wait until every fill has ended, commits included (they run after the response)."""
        with trio.fail_after(10):
            await self.proxy.wait_fills_ended()


def make_settings(
    cache_dir: Path, routes: list[dict[str, Any]], **sections: dict[str, Any]
) -> Settings:
    """Settings for a test proxy: port 0, no admin plane, small graceful timeout."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "graceful_timeout": "2s", "node_name": "test-node"},
        "cache": {"dir": str(cache_dir)},
        "admin": {"listen": ""},
        "route": routes,
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_settings(data, source="test")


@asynccontextmanager
async def run_proxy(
    settings: Settings, *, connect: Connector | None = None, clock: Clock | None = None
) -> AsyncIterator[RunningProxy]:
    """Run ``settings`` on loopback; on exit, shut down gracefully."""
    shutdown = trio.Event()
    async with open_proxy(settings, connect=connect, clock=clock) as proxy:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve,
                    proxy,
                    settings.server,
                    clock=proxy.clock,
                    shutdown=shutdown,
                    on_listening=proxy.set_listening,
                )
            )
            yield RunningProxy(f"http://127.0.0.1:{port}", port, proxy, settings, shutdown)
            shutdown.set()


ProxyFactory = Callable[..., AbstractAsyncContextManager[RunningProxy]]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> ProxyFactory:
    """``async with proxy_factory(routes=[...], cache={...}) as p:`` runs a proxy."""

    def factory(
        routes: list[dict[str, Any]],
        connect: Connector | None = None,
        clock: Clock | None = None,
        **sections: dict[str, Any],
    ) -> AbstractAsyncContextManager[RunningProxy]:
        settings = make_settings(tmp_path / "cache", routes, **sections)
        return run_proxy(settings, connect=connect, clock=clock)

    return factory
