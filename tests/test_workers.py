"""``proxychain serve --workers N`` with real processes on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from proxychain import workers
from tests.fakes import FakeOrigin, Reply, ok, serve_origin

pytestmark = pytest.mark.loopback

POLL_S = 0.05
START_TIMEOUT_S = 10.0  # interpreter start-up plus imports, on a loaded CI machine
STOP_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 200  # fresh connections tried before giving up on seeing both workers
HELD_CONNECTIONS = 6  # kept open at once by the balance test

CONFIG = """\
[server]
listen = "127.0.0.1:0"
graceful_timeout = "1s"
node_name = "test-node"

[cache]
dir = "{cache}"

[admin]
listen = ""

[[route]]
prefix = "/"
upstreams = "{upstream}"
"""


@contextmanager
def _supervisor(
    tmp_path: Path, upstream: str, *, admin: str = ""
) -> Iterator[subprocess.Popen[bytes]]:
    config = tmp_path / "proxychain.toml"
    text = CONFIG.format(cache=tmp_path / "cache", upstream=upstream)
    config.write_text(text.replace('[admin]\nlisten = ""', f'[admin]\nlisten = "{admin}"'))
    log = (tmp_path / "proxychain.log").open("wb")
    env = {**os.environ, workers.MULTIPROC_DIR_ENV: str(tmp_path / "metrics")}
    argv = [sys.executable, "-m", "proxychain", "serve", "--config", str(config), "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # the test failed before stopping it: take the workers too
            proc.kill()
            proc.wait()
            for pid in _pids(_log(tmp_path), STARTED):
                _kill_quietly(pid)
        log.close()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "proxychain.log").read_text(errors="replace")


SERVING = r"worker \d \(pid (\d+)\) serving"
STARTED = r"worker \d started \(pid (\d+)\)"


def _pids(log: str, pattern: str) -> list[int]:
    return [int(p) for p in re.findall(pattern, log)]


async def _wait_for(tmp_path: Path, pattern: str, count: int = 1) -> list[str]:
    with trio.fail_after(START_TIMEOUT_S):
        while len(found := re.findall(pattern, _log(tmp_path), re.MULTILINE)) < count:
            await trio.sleep(POLL_S)
    return found


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:  # a fresh connection: any worker may accept it
        return await client.get(url)


async def test_two_workers_share_port_disk_tier_restart_and_stop(tmp_path: Path) -> None:
    origin = FakeOrigin()
    origin.set("/a.txt", ok(b"shared\n", ("cache-control", "max-age=600")))
    old_purges = tmp_path / "cache" / "purge.log"  # from an earlier run of the cache dir
    old_purges.parent.mkdir()
    old_purges.write_text('{"url": "http://old/a.txt", "prefix": null}\n')
    async with serve_origin(origin) as upstream:
        with _supervisor(tmp_path, upstream) as proc:
            (port,) = await _wait_for(tmp_path, r"supervising 2 workers on 127\.0\.0\.1:(\d+)")
            assert not old_purges.exists()  # emptied before any worker follows it
            await _wait_for(tmp_path, SERVING, count=2)
            serving = set(_pids(_log(tmp_path), SERVING))
            url = f"http://127.0.0.1:{port}/a.txt"

            first = await _get(url)
            assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
            filler = int(first.headers["x-proxychain-worker"])
            # The other worker's memory tier is empty: its first answer is a disk hit.
            for _ in range(MAX_CONNECTIONS):
                other = await _get(url)
                if int(other.headers["x-proxychain-worker"]) != filler:
                    break
            answered = {filler, int(other.headers["x-proxychain-worker"])}
            assert answered == serving
            assert (other.headers["x-cache"], other.headers["x-cache-tier"]) == ("HIT", "disk")
            assert other.content == b"shared\n"
            assert origin.count("/a.txt") == 1

            # A worker that dies is logged and replaced.
            os.kill(filler, signal.SIGKILL)
            await _wait_for(tmp_path, rf"worker \d \(pid {filler}\) died: killed by SIGKILL")
            await _wait_for(tmp_path, SERVING, count=3)
            replaced = set(_pids(_log(tmp_path), SERVING)) - serving
            assert len(replaced) == 1
            assert (await _get(url)).status_code == 200

            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT_S):
                while proc.poll() is None:
                    await trio.sleep(POLL_S)
            assert proc.returncode == 0
            for pid in (serving - {filler}) | replaced:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
    assert "received SIGTERM: stopping workers" in _log(tmp_path)
    assert "killing" not in _log(tmp_path)  # both drained within the grace period


def test_multiproc_dir_is_created_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers.MULTIPROC_DIR_ENV, raising=False)
    created = workers._prepare_multiproc_dir()
    try:
        assert created is not None
        assert os.environ[workers.MULTIPROC_DIR_ENV] == created
        assert os.listdir(created) == []
    finally:
        # monkeypatch.delenv records nothing for an unset variable: undo by hand, or every
        # later test (and the processes it starts) inherits the directory.
        os.environ.pop(workers.MULTIPROC_DIR_ENV, None)
        if created is not None:
            os.rmdir(created)


def test_multiproc_dir_is_wiped_of_stale_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("kept")
    monkeypatch.setenv(workers.MULTIPROC_DIR_ENV, str(tmp_path))
    assert workers._prepare_multiproc_dir() is None
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


async def test_connections_held_open_are_shared_between_the_workers(tmp_path: Path) -> None:
    """Connections opened one after another and kept open go to the worker with fewer: the
    one ahead leaves each new connection to its sibling for a moment (proxychain.balance)."""
    origin = FakeOrigin()
    origin.set("/a.txt", ok(b"shared\n", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as upstream:
        with _supervisor(tmp_path, upstream) as proc:
            (port,) = await _wait_for(tmp_path, r"supervising 2 workers on 127\.0\.0\.1:(\d+)")
            await _wait_for(tmp_path, SERVING, count=2)
            answered: list[str] = []
            async with contextlib.AsyncExitStack() as held:
                for _ in range(HELD_CONNECTIONS):
                    client = await held.enter_async_context(httpx.AsyncClient())
                    response = await client.get(f"http://127.0.0.1:{port}/a.txt")
                    assert response.status_code == 200
                    answered.append(response.headers["x-proxychain-worker"])
            shares = sorted(answered.count(pid) for pid in set(answered))
            # Even, give or take one connection a busy machine woke a worker too late for.
            assert len(shares) == 2, answered
            assert shares[0] >= HELD_CONNECTIONS // 2 - 1, answered
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT_S):
                while proc.poll() is None:
                    await trio.sleep(POLL_S)


async def test_a_key_asked_of_both_workers_at_once_is_fetched_once(tmp_path: Path) -> None:
    """The worker that leads a fill holds the key's fill lock; the other one streams the
    leader's temp file to its own clients instead of fetching too (proxychain.siblingfill)."""
    origin = FakeOrigin()
    origin.set("/a.txt", ok(b"shared\n", ("cache-control", "max-age=600")))
    pieces = [bytes([i]) * 64 * 1024 for i in range(8)]
    origin.set(
        "/slow.bin",
        Reply(headers=[("cache-control", "max-age=600")], body=pieces, chunk_delay=0.1),
    )
    async with serve_origin(origin) as upstream:
        with _supervisor(tmp_path, upstream) as proc:
            (port,) = await _wait_for(tmp_path, r"supervising 2 workers on 127\.0\.0\.1:(\d+)")
            await _wait_for(tmp_path, SERVING, count=2)
            got: list[httpx.Response] = []
            async with contextlib.AsyncExitStack() as held:
                clients = []
                for _ in range(HELD_CONNECTIONS):  # connections placed on both workers first
                    client = await held.enter_async_context(httpx.AsyncClient())
                    assert (await client.get(f"http://127.0.0.1:{port}/a.txt")).status_code == 200
                    clients.append(client)

                async def fetch(client: httpx.AsyncClient) -> None:
                    got.append(await client.get(f"http://127.0.0.1:{port}/slow.bin"))

                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(fetch, client)
            assert [(r.status_code, r.content) for r in got] == [(200, b"".join(pieces))] * len(
                clients
            )
            assert len({r.headers["x-proxychain-worker"] for r in got}) == 2
            assert origin.count("/slow.bin") == 1
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT_S):
                while proc.poll() is None:
                    await trio.sleep(POLL_S)
    assert not list((tmp_path / "cache" / "fills").iterdir())  # every lock file let go


async def test_admin_stats_count_every_workers_requests(tmp_path: Path) -> None:
    """Worker 0 serves the admin plane; its /admin/stats adds up what both workers served."""
    origin = FakeOrigin()
    origin.set("/a.txt", ok(b"shared\n", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as upstream:
        with _supervisor(tmp_path, upstream, admin="127.0.0.1:0") as proc:
            (port,) = await _wait_for(tmp_path, r"supervising 2 workers on 127\.0\.0\.1:(\d+)")
            (admin,) = await _wait_for(tmp_path, r"admin plane on http://127\.0\.0\.1:(\d+)/")
            await _wait_for(tmp_path, SERVING, count=2)
            answered: list[str] = []
            async with contextlib.AsyncExitStack() as held:  # held open: one per worker
                for _ in range(HELD_CONNECTIONS):
                    client = await held.enter_async_context(httpx.AsyncClient())
                    response = await client.get(f"http://127.0.0.1:{port}/a.txt")
                    answered.append(response.headers["x-proxychain-worker"])
            assert len(set(answered)) == 2, answered
            stats_url = f"http://127.0.0.1:{admin}/admin/stats"
            with trio.fail_after(START_TIMEOUT_S):  # the sibling shares its figures each second
                while True:
                    stats = (await _get(stats_url)).json()
                    (route,) = stats["routes"]
                    if route["requests"] == HELD_CONNECTIONS:
                        break
                    await trio.sleep(POLL_S)
            assert stats["workers"] == 2
            # The first request filled the key; the other worker's first one may have come
            # while that fill was still open, and streamed it (a shared MISS, not a hit).
            assert route["hits"] >= HELD_CONNECTIONS - 2
            memory = next(t for t in stats["tiers"] if t["name"] == "memory")
            assert memory["entries"] == 2  # each worker holds the body in its own memory tier
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT_S):
                while proc.poll() is None:
                    await trio.sleep(POLL_S)
    assert not list((tmp_path / "metrics").glob("stats-*.json"))  # removed on the way out
