"""The proxy end to end on loopback: real sockets, the real clock, fake upstreams, httpx."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import ProxyFactory
from tests.fakes import FakeOrigin, Reply, ok, serve_origin

pytestmark = pytest.mark.loopback

KIB = 1024
MIB = 1024 * KIB


def _route(upstream: str, prefix: str = "/", **extra: object) -> dict[str, object]:
    return {"prefix": prefix, "upstreams": upstream, **extra}


async def test_miss_then_memory_hit(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/a.txt", ok(b"hello world\n", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            first = await client.get("/a.txt")
            await p.settled()
            second = await client.get("/a.txt")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == b"hello world\n"
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["x-cache-tier"] == "memory"
    assert int(second.headers["age"]) >= 0
    assert origin.count("/a.txt") == 1


async def test_large_body_is_a_disk_hit_and_survives_restart(
    proxy_factory: ProxyFactory,
) -> None:
    body = os.urandom(3 * MIB)
    origin = FakeOrigin()
    origin.set("/big.bin", ok(body, ("cache-control", "max-age=600")))
    cache = {"memory_object_max": "1MiB"}
    async with serve_origin(origin) as up:
        async with proxy_factory([_route(up)], cache=cache) as p:
            async with httpx.AsyncClient(base_url=p.url) as client:
                miss = await client.get("/big.bin")
                await p.settled()
                hit = await client.get("/big.bin")
        async with proxy_factory([_route(up)], cache=cache) as p:
            async with httpx.AsyncClient(base_url=p.url) as client:
                after_restart = await client.get("/big.bin")
    assert miss.content == hit.content == after_restart.content == body
    assert miss.headers["x-cache"] == "MISS"
    assert (hit.headers["x-cache"], hit.headers["x-cache-tier"]) == ("HIT", "disk")
    assert after_restart.headers["x-cache"] == "HIT"
    assert after_restart.headers["x-cache-tier"] == "disk"
    assert origin.count("/big.bin") == 1


async def test_small_entry_is_promoted_to_memory_after_restart(
    proxy_factory: ProxyFactory,
) -> None:
    origin = FakeOrigin()
    origin.set("/s", ok(b"small", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as up:
        async with proxy_factory([_route(up)]) as p, httpx.AsyncClient(base_url=p.url) as c:
            await c.get("/s")
        async with proxy_factory([_route(up)]) as p, httpx.AsyncClient(base_url=p.url) as c:
            disk_hit = await c.get("/s")
            memory_hit = await c.get("/s")
    assert disk_hit.headers["x-cache-tier"] == "disk"
    assert memory_hit.headers["x-cache-tier"] == "memory"
    assert disk_hit.content == memory_hit.content == b"small"


async def test_truncated_upstream_body_is_aborted_and_not_cached(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    body = os.urandom(200 * KIB)
    origin = FakeOrigin()
    origin.set(
        "/cut",
        Reply(
            headers=[("cache-control", "max-age=600")],
            body=[body[: 50 * KIB], body[50 * KIB :]],
            cut_after=60 * KIB,
        ),
    )
    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/cut")
            origin.set("/cut", ok(body, ("cache-control", "max-age=600")))
            whole = await client.get("/cut")
    assert whole.headers["x-cache"] == "MISS"
    assert whole.content == body
    assert origin.count("/cut") == 2
    cache = tmp_path / "cache"
    files = [f.relative_to(cache) for f in cache.rglob("*") if f.is_file()]
    assert [f for f in files if f.parts[0] == "tmp"] == []
    assert len([f for f in files if f.suffix == ".body"]) == 1


async def test_head_and_hop_by_hop_and_forwarding_headers(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set(
        "/h",
        ok(
            b"0123456789",
            ("cache-control", "max-age=600"),
            ("connection", "x-secret"),
            ("x-secret", "upstream-only"),
            ("keep-alive", "timeout=5"),
        ),
    )
    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            head = await client.head("/h")
            got = await client.get(
                "/h", headers={"Connection": "x-private", "X-Private": "client-only", "TE": "x"}
            )
    assert head.status_code == 200
    assert head.content == b""
    assert got.content == b"0123456789"
    for response in (head, got):
        assert "x-secret" not in response.headers
        assert "keep-alive" not in response.headers
        assert "test-node" in response.headers["via"]
    sent = origin.requests[-1]
    assert "x-private" not in sent.headers
    assert "te" not in sent.headers
    assert sent.headers.get("x-forwarded-for") == "127.0.0.1"
    assert sent.headers.get("x-forwarded-proto") == "http"
    assert sent.headers.get("x-forwarded-host") == f"127.0.0.1:{p.port}"
    assert "test-node" in (sent.headers.get("via") or "")


async def test_post_passes_through_with_streamed_body(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/upload", Reply(status=201, body=b"created"))
    chunks = [os.urandom(64 * KIB) for _ in range(8)]

    async def stream() -> object:
        for chunk in chunks:
            yield chunk

    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            response = await client.post("/upload", content=stream())  # type: ignore[arg-type]
    assert response.status_code == 201
    assert response.headers["x-cache"] == "BYPASS"
    assert origin.last_body == b"".join(chunks)
    assert origin.requests[-1].method == "POST"


async def test_unsafe_method_invalidates_the_cached_url(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/doc", ok(b"v1", ("cache-control", "max-age=600")))
    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            await client.get("/doc")
            assert (await client.get("/doc")).headers["x-cache"] == "HIT"
            await client.put("/doc", content=b"v2")
            after = await client.get("/doc")
    assert after.headers["x-cache"] == "MISS"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/elsewhere/x", 404)],
)
async def test_no_route_is_404(proxy_factory: ProxyFactory, path: str, status: int) -> None:
    async with proxy_factory([_route("http://127.0.0.1:9", prefix="/only/")]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            response = await client.get(path)
    assert response.status_code == status
    assert b"no route" in response.content


async def test_unreachable_upstream_is_502(proxy_factory: ProxyFactory) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with proxy_factory([_route(f"http://127.0.0.1:{port}", retries=0)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            response = await client.get("/x")
    assert response.status_code == 502
    assert b"127.0.0.1" in response.content


async def test_upstream_timeout_is_504(proxy_factory: ProxyFactory) -> None:
    origin = FakeOrigin()
    origin.set("/slow", Reply(never=True))
    route = _route("", timeouts={"first_byte": "0.2s"})
    async with serve_origin(origin) as up:
        route["upstreams"] = up
        async with proxy_factory([route]) as p, httpx.AsyncClient(base_url=p.url) as client:
            response = await client.get("/slow")
    assert response.status_code == 504


async def test_loop_is_508(proxy_factory: ProxyFactory) -> None:
    async with proxy_factory([_route("http://127.0.0.1:9")]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client:
            response = await client.get("/x", headers={"Via": "1.1 other, 1.1 test-node"})
    assert response.status_code == 508


async def _raw(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_malformed_request_is_400_and_huge_head_is_431(
    proxy_factory: ProxyFactory,
) -> None:
    async with proxy_factory(
        [_route("http://127.0.0.1:9")], server={"max_header_bytes": "8KiB"}
    ) as p:
        bad = await _raw(p.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        huge = await _raw(
            p.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        )
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert huge.startswith(b"HTTP/1.1 431 ")


async def test_graceful_shutdown_lets_in_flight_response_finish(
    proxy_factory: ProxyFactory,
) -> None:
    origin = FakeOrigin()
    origin.set(
        "/slow",
        Reply(
            body=[b"a" * 1000, b"b" * 1000],
            chunk_delay=0.2,
            headers=[("cache-control", "max-age=60")],
        ),
    )
    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        async with httpx.AsyncClient(base_url=p.url) as client, trio.open_nursery() as n:
            results: list[httpx.Response] = []

            async def fetch() -> None:
                results.append(await client.get("/slow"))

            n.start_soon(fetch)
            while origin.count("/slow") == 0:
                await trio.sleep(0.01)
            p.shutdown.set()
        assert results[0].content == b"a" * 1000 + b"b" * 1000
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=p.url) as client:
                await client.get("/slow")


async def test_slow_client_slows_the_upstream_read(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    chunk = b"x" * (256 * KIB)
    total = 800 * len(chunk)  # 200 MiB, the same chunk object repeated
    origin = FakeOrigin()
    origin.set("/big", Reply(headers=[("cache-control", "max-age=60")], body=[chunk] * 800))
    async with serve_origin(origin) as up, proxy_factory([_route(up)]) as p:
        stream = await trio.open_tcp_stream("127.0.0.1", p.port)
        async with stream:
            await stream.send_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            received = len(await stream.receive_some(65536))
            await trio.sleep(0.5)  # the client stops reading; real sockets need the real clock
            tmp_dir = tmp_path / "cache" / "tmp"
            temp_files = [f for f in tmp_dir.iterdir() if f.is_file()]
            filled = sum(f.stat().st_size for f in temp_files)
            while chunk_in := await stream.receive_some(1024 * KIB):
                received += len(chunk_in)
                if received >= total:
                    break
    # Only what fits in the socket buffers between the three parties was read ahead.
    assert filled < 64 * MIB, filled
    assert temp_files  # the fill was under way (its last batch may not be in the file yet)
    assert received > total  # the head plus the whole body
