"""The workloads, each a bounded async function from a :class:`Bench` to table rows.

Every scenario runs the same requests against each proxy in turn (never two at once: they
share 2 cores with the load generator), uses keys unique to the run so "cold" is cold, and
counts upstream traffic by the difference of the origin's ``/__stats`` counters around the
measured part. Keys and body sizes are in :mod:`payload`'s grammar; the measured quantity of
each scenario is described in bench/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import targets
import trio
from loadgen import LoadResult, fetch, run_load, run_wrk, wrk_available
from payload import bytes_path
from procs import HOST, Managed, StartError, peak_rss_kib, reset_peak_rss, rss_kib
from seed import scale_path

__all__ = ["SCENARIOS", "Bench", "Row", "ratio", "table_rows"]

KIB, MIB, GIB = 1024, 1024**2, 1024**3
HIT_SIZES = (KIB, 64 * KIB, MIB, 32 * MIB)
PASS_THROUGH = "proxy.py"  # the target without a cache: hits only
SWR_STALE_LABELS = ("STALE", "UPDATING")  # nginx calls a stale hit during a refresh UPDATING


@dataclass(frozen=True, kw_only=True)
class Row:
    """One line of the comparison table: a metric of a scenario, one value per target."""

    scenario: str
    metric: str
    values: dict[str, float | str]
    better: str = ""  # "higher", "lower" or "" (not a figure of merit)


def table_rows(
    scenario: str, values: dict[str, dict[str, float | str]], better: dict[str, str]
) -> list[Row]:
    """One :class:`Row` per metric of ``values`` (metric -> target -> value), in its order;
    ``better`` names the metrics that are figures of merit."""
    return [
        Row(scenario=scenario, metric=m, values=v, better=better.get(m, ""))
        for m, v in values.items()
    ]


@dataclass(kw_only=True)
class Bench:
    """What the scenarios share (mutable: the origin is replaced during the outage)."""

    tmp: Path
    origin: Managed
    proxies: dict[str, Managed]
    run_id: str
    quick: bool
    duration: float
    connections: int
    ceiling_processes: int
    use_wrk: bool
    scale_sizes: tuple[int, ...]
    hit_sizes: tuple[int, ...] = HIT_SIZES
    proxy_workers: int = 1  # proxychain --workers, for the instances a scenario starts itself
    nginx_workers: int = 2
    gomod_runs: int = 3
    scale_seed: str = "direct"  # proxychain's scale seeding: "direct" (seed.py) or "requests"
    seed_fsync: bool = False  # seed.py --no-fsync unless set
    profile_dir: Path | None = None  # --profile: py-spy proxychain in scale's hit runs, here
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def caches(self) -> dict[str, Managed]:
        """The proxies that cache: every target but the pass-through proxy.py."""
        return {k: v for k, v in self.proxies.items() if k != PASS_THROUGH}

    def key(self, scenario: str, *parts: object) -> str:
        """A key tag unique to this run."""
        return "-".join([scenario, self.run_id, *map(str, parts)])


async def _get_json(port: int, path: str) -> Any:
    """GET ``path`` over HTTP/1.0 from a loopback port and parse the body as JSON.

    Raises:
        trio.TooSlowError: no complete answer within 5 s.
        OSError: the port is closed.
        ValueError: the body is not JSON.
    """
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(HOST, port)
        try:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        finally:
            await stream.aclose()
    return json.loads(data.partition(b"\r\n\r\n")[2])


async def origin_stats(port: int) -> dict[str, int]:
    """The origin's (or outage stub's) counters."""
    return dict(await _get_json(port, "/__stats"))


def _delta(after: dict[str, int], before: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


async def _load(
    bench: Bench, port: int, path: str, *, connections: int, duration: float
) -> LoadResult:
    """Throughput run on one path: wrk when present (and allowed), else the Python client."""
    if bench.use_wrk and wrk_available():
        return await run_wrk(
            f"http://{HOST}:{port}{path}", connections=connections, duration=duration
        )
    return await run_load(HOST, port, [path], connections=connections, duration=duration)


def _record(bench: Bench, scenario: str, target: str, label: str, result: object) -> None:
    data = asdict(result) if hasattr(result, "__dataclass_fields__") else result  # type: ignore[call-overload]
    bench.raw.setdefault(scenario, {}).setdefault(target, {})[label] = data


async def hits(bench: Bench) -> list[Row]:
    """Fresh hits at several body sizes: throughput and latency against nginx and the ceiling."""
    rows: list[Row] = []
    for size in bench.hit_sizes:
        label = _size_label(size)
        conns = (
            bench.connections
            if size <= 64 * KIB
            else max(2, bench.connections // (4 if size <= MIB else 8))
        )
        path = bytes_path(size, bench.key("hits", size))
        results: dict[str, LoadResult] = {}
        upstream: dict[str, float | str] = {}
        warm: dict[str, float | str] = {}
        ceiling = targets.ceiling(bench.tmp, size, bench.ceiling_processes)
        try:
            await ceiling.start()
            results["ceiling"] = await _load(
                bench, ceiling.port, "/", connections=conns, duration=bench.duration
            )
        finally:
            ceiling.stop()
        for name, proxy in bench.proxies.items():
            first = await fetch(HOST, proxy.port, path)
            second = await fetch(HOST, proxy.port, path)
            warm[name] = f"{first.x_cache or first.status}>{second.x_cache or second.status}"
            before = await origin_stats(bench.origin.port)
            results[name] = await _load(
                bench, proxy.port, path, connections=conns, duration=bench.duration
            )
            after = await origin_stats(bench.origin.port)
            upstream[name] = _delta(after, before, "requests")
        for name, res in results.items():
            _record(bench, "hits", name, label, res)
        scen = f"hits {label} (c={conns}, {next(iter(results.values())).tool})"
        rows += [
            Row(
                scenario=scen,
                metric="req/s",
                values={k: r.req_per_s for k, r in results.items()},
                better="higher",
            ),
            Row(
                scenario=scen,
                metric="MiB/s",
                values={k: r.mib_per_s for k, r in results.items()},
                better="higher",
            ),
            Row(
                scenario=scen,
                metric="p50 ms",
                values={k: r.p50_ms for k, r in results.items()},
                better="lower",
            ),
            Row(
                scenario=scen,
                metric="p99 ms",
                values={k: r.p99_ms for k, r in results.items()},
                better="lower",
            ),
            Row(scenario=scen, metric="errors", values={k: r.errors for k, r in results.items()}),
            Row(scenario=scen, metric="warm X-Cache 1st>2nd", values=warm),
            Row(scenario=scen, metric="upstream requests during run", values=upstream),
        ]
    return rows


def _size_label(size: int) -> str:
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


# Miss workloads: (label, connections, requests, origin options). The loopback origin answers
# in about a millisecond, so those rows are the proxy's own cost per miss; the WAN-like origin
# (20 ms to the first byte, 100 Mbit/s) is what a branch-office cache sits in front of.
_MISS_RUNS: tuple[tuple[str, int, int, dict[str, float]], ...] = (
    ("loopback origin, c=8", 8, 200, {}),
    ("loopback origin, one at a time", 1, 100, {}),
    ("WAN-like origin (20 ms, 100 Mbit/s), one at a time", 1, 20, {"delay": 0.02, "rate": 12.5e6}),
)


async def miss(bench: Bench) -> list[Row]:
    """Cold 1 MiB fetches over distinct keys, through each proxy and straight from the origin."""
    out: list[Row] = []
    for run, (label, conns, full_count, opts) in enumerate(_MISS_RUNS):
        count = min(full_count, 20) if bench.quick else full_count
        rows: dict[str, dict[str, float | str]] = {}
        servers = {"origin": bench.origin, **bench.caches}
        for name, server in servers.items():
            tag = bench.key("miss", run)  # every run cold, for each server

            def keys(
                tag: str = tag, opts: dict[str, float] = opts, count: int = count
            ) -> Iterator[str]:
                for i in range(count):
                    yield bytes_path(MIB, f"{tag}-{i}", **opts)

            before = await origin_stats(bench.origin.port)
            res = await run_load(
                HOST, server.port, keys, connections=conns, requests=count, check_bodies=True
            )
            after = await origin_stats(bench.origin.port)
            _record(bench, "miss", name, f"1MiB {label}", res)
            for metric, value in (
                ("req/s", res.req_per_s),
                ("MiB/s", res.mib_per_s),
                ("first byte p50 ms", res.first_byte_p50_ms),
                ("p50 ms", res.p50_ms),
                ("p99 ms", res.p99_ms),
                ("p50 / origin's p50", "")
                if name == "origin"
                else ("p50 / origin's p50", ratio(res.p50_ms, rows["p50 ms"].get("origin"))),
                ("errors + bad bodies", res.errors),
                ("upstream fetches", _delta(after, before, "full")),
            ):
                rows.setdefault(metric, {})[name] = value
        scen = f"miss 1 MiB x{count} distinct, {label}"
        better = {
            "req/s": "higher",
            "MiB/s": "higher",
            "p50 ms": "lower",
            "p99 ms": "lower",
            "p50 / origin's p50": "lower",
        }
        out += table_rows(scen, rows, better)
    return out


def ratio(a: float | str | None, b: float | str | None) -> str:
    """``a / b`` as ``1.23x``, or empty when either is not a figure or ``b`` is 0."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.2f}x"
    return ""


async def herd(bench: Bench) -> list[Row]:
    """Many clients ask for one cold big key at once while the origin takes ~1 s to fill it."""
    clients, size = (50, 2 * MIB) if bench.quick else (500, 10 * MIB)
    fill_s = 1.0
    rows: dict[str, dict[str, float | str]] = {}
    for name, proxy in bench.caches.items():
        path = bytes_path(size, bench.key("herd", name), rate=size / fill_s)
        before = await origin_stats(bench.origin.port)
        res = await run_load(
            HOST,
            proxy.port,
            [path],
            connections=clients,
            requests=clients,
            check_bodies=True,
            request_timeout=60,
        )
        after = await origin_stats(bench.origin.port)
        _record(bench, "herd", name, _size_label(size), res)
        complete = res.statuses.get("200", 0) - res.bad_bodies
        for metric, value in (
            ("upstream fetches", _delta(after, before, "full")),
            ("first byte p50 ms", res.first_byte_p50_ms),
            ("first byte p99 ms", res.first_byte_p99_ms),
            ("first byte p50 ms, seen by the client task", res.first_byte_seen_p50_ms),
            ("first byte p99 ms, seen by the client task", res.first_byte_seen_p99_ms),
            ("complete p99 ms", res.p99_ms),
            ("bodies complete+correct", f"{complete}/{clients}"),
            ("errors", res.errors),
        ):
            rows.setdefault(metric, {})[name] = value
    scen = f"herd {clients} x 1 cold {_size_label(size)}, fill ~{fill_s:g} s"
    better = {
        "upstream fetches": "lower",
        "first byte p50 ms": "lower",
        "first byte p99 ms": "lower",
    }
    return table_rows(scen, rows, better)


async def _kill_origin(bench: Bench) -> Managed:
    """SIGKILL the origin and put the counting outage stub on its port."""
    import signal

    port = bench.origin.port
    bench.origin.stop(signal.SIGKILL)
    stub = targets.origin(bench.tmp, port, down=True)
    await stub.start()
    return stub


async def _restore_origin(bench: Bench, stub: Managed) -> None:
    stub.stop()
    bench.origin = targets.origin(bench.tmp, bench.origin.port)
    await bench.origin.start()


async def _probe_never_cached(
    bench: Bench, port: int, name: str, probes: list[tuple[int, float]]
) -> None:
    """Every 0.25 s ask for a key never cached; record (status, latency ms) until cancelled."""
    for j in range(10_000):
        path = bytes_path(KIB, bench.key("never", name, j))
        s = await fetch(HOST, port, path, timeout=10)
        probes.append((s.status, s.latency_s * 1e3))
        await trio.sleep(0.25)


async def _until_serving(bench: Bench, port: int, name: str, timeout: float = 90.0) -> None:
    """Wait until the proxy on ``port`` fetches a never-cached key from the origin again."""
    with trio.move_on_after(timeout):
        for j in range(1_000_000):
            s = await fetch(HOST, port, bytes_path(KIB, bench.key("back", name, j)), timeout=10)
            if s.status == 200:
                return
            await trio.sleep(0.25)
    raise RuntimeError(f"{name} did not serve from the origin again within {timeout:g} s")


async def outage(bench: Bench) -> list[Row]:
    """The origin dies after the cache was filled: who keeps serving, and how hard they retry."""
    keys_n, size, conns = 10, 16 * KIB, 8
    run_s = 3.0 if bench.quick else 10.0
    rows: dict[str, dict[str, float | str]] = {}
    for name, proxy in bench.caches.items():
        # A health-probing proxy saw the origin die in the targets' outages before its own,
        # and may still hold it for down: its keys must be filled from the live origin.
        await _until_serving(bench, proxy.port, name)
        paths = [
            bytes_path(size, bench.key("outage", name, i), max_age=1, sie=3600)
            for i in range(keys_n)
        ]
        for p in paths:
            await fetch(HOST, proxy.port, p)
        await trio.sleep(1.2)  # every entry is now stale (max-age=1)
        stub = await _kill_origin(bench)
        probes: list[tuple[int, float]] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_probe_never_cached, bench, proxy.port, name, probes)
                res = await run_load(
                    HOST, proxy.port, paths, connections=conns, duration=run_s, request_timeout=10
                )
                nursery.cancel_scope.cancel()
            down = await origin_stats(stub.port)
        finally:
            await _restore_origin(bench, stub)
        _record(bench, "outage", name, "load", res)
        transport = sum(res.error_kinds.values())
        total = res.requests + transport
        statuses = sorted({st for st, _ in probes})
        lat = sorted(ms for _, ms in probes)
        for metric, value in (
            ("served 200 while down %", round(100 * res.statuses.get("200", 0) / max(total, 1), 1)),
            ("requests", total),
            ("errors", res.errors),
            ("X-Cache mix", " ".join(f"{k}:{v}" for k, v in sorted(res.x_cache.items()))),
            ("upstream attempts while down", down.get("requests", 0) + 0),
            ("upstream connections while down", down.get("connections", 0)),
            ("never-cached key status", "/".join(map(str, statuses))),
            ("never-cached key p50 ms", lat[len(lat) // 2] if lat else 0.0),
            ("never-cached key max ms", lat[-1] if lat else 0.0),
        ):
            rows.setdefault(metric, {})[name] = value
        await trio.sleep(1.0)  # let a health-probing proxy see the origin back
    # ... and the scenarios that follow need every proxy serving from it again.
    for name, proxy in bench.caches.items():
        await _until_serving(bench, proxy.port, name)
    scen = f"outage {run_s:g} s, {keys_n} stale keys (max-age=1, stale-if-error=3600)"
    better = {"served 200 while down %": "higher", "upstream attempts while down": "lower"}
    return table_rows(scen, rows, better)


async def swr(bench: Bench) -> list[Row]:
    """A hot key with max-age=1, stale-while-revalidate=60: stale-hit latency, refresh traffic."""
    run_s, conns, max_age = (3.0 if bench.quick else 10.0), 4, 1
    rows: dict[str, dict[str, float | str]] = {}
    for name, proxy in bench.caches.items():
        path = bytes_path(4 * KIB, bench.key("swr", name), max_age=max_age, swr=60)
        await fetch(HOST, proxy.port, path)
        before = await origin_stats(bench.origin.port)
        res = await run_load(HOST, proxy.port, [path], connections=conns, duration=run_s)
        after = await origin_stats(bench.origin.port)
        _record(bench, "swr", name, "load", res)
        windows = run_s / max_age
        stale = [
            res.latency_by_cache_ms[k]["p99"]
            for k in SWR_STALE_LABELS
            if k in res.latency_by_cache_ms
        ]
        for metric, value in (
            (
                "conditional requests / window",
                round(_delta(after, before, "conditional") / windows, 2),
            ),
            ("full fetches / window", round(_delta(after, before, "full") / windows, 2)),
            ("304 answers", _delta(after, before, "not_modified")),
            ("p50 ms", res.p50_ms),
            ("p99 ms", res.p99_ms),
            ("stale-hit p99 ms", max(stale) if stale else "-"),
            ("X-Cache mix", " ".join(f"{k}:{v}" for k, v in sorted(res.x_cache.items()))),
            ("errors", res.errors),
        ):
            rows.setdefault(metric, {})[name] = value
    scen = f"swr {run_s:g} s on one key, max-age={max_age}, swr=60 (c={conns}, python)"
    better = {"p50 ms": "lower", "p99 ms": "lower", "stale-hit p99 ms": "lower"}
    return table_rows(scen, rows, better)


async def stream1g(bench: Bench) -> list[Row]:
    """One cold huge body: throughput, and the proxy's peak memory (VmHWM) while it streams."""
    size = 64 * MIB if bench.quick else GIB
    rows: dict[str, dict[str, float | str]] = {}
    for name, server in {"origin": bench.origin, **bench.caches}.items():
        path = bytes_path(size, bench.key("big", name))
        reset_peak_rss(server.pid)
        baseline = rss_kib(server.pid)  # a warm memory tier is not growth
        res = await run_load(
            HOST,
            server.port,
            [path],
            connections=1,
            requests=1,
            check_bodies=True,
            request_timeout=300,
        )
        peak, total = peak_rss_kib(server.pid)
        _record(bench, "stream1g", name, _size_label(size), res)
        for metric, value in (
            ("MiB/s", res.mib_per_s),
            ("seconds", res.p50_ms / 1e3),
            ("peak RSS, largest process MiB", round(peak / 1024, 1)),
            ("peak RSS, all processes MiB", round(total / 1024, 1)),
            ("peak RSS growth, all processes MiB", round((total - baseline) / 1024, 1)),
            ("body complete+correct", "yes" if res.errors == 0 and res.requests == 1 else "NO"),
        ):
            rows.setdefault(metric, {})[name] = value
    scen = f"stream cold {_size_label(size)} (python client)"
    better = {
        "MiB/s": "higher",
        "peak RSS, largest process MiB": "lower",
        "peak RSS growth, all processes MiB": "lower",
    }
    return table_rows(scen, rows, better)


async def scale(bench: Bench) -> list[Row]:
    """Restart time, time-to-first-hit and hit latency with many small entries on disk."""
    rows: list[Row] = []
    persistent = {k: v for k, v in bench.caches.items() if k != "varnish"}
    seeded = dict.fromkeys(persistent, 0)
    hit_s = 2.0 if bench.quick else 5.0
    for n in bench.scale_sizes:
        values: dict[str, dict[str, float | str]] = {}
        for name, proxy in persistent.items():
            tag = bench.key("scale", name)
            direct = name == "proxychain" and bench.scale_seed == "direct"
            t0 = trio.current_time()
            if n > seeded[name]:
                if direct:
                    await _seed_direct(bench, proxy, tag, seeded[name], n)
                else:
                    await _seed_requests(proxy, tag, seeded[name], n)
            seeded[name] = n
            seed_s = trio.current_time() - t0
            # The seeding's dirty pages are written back before the hits are timed, so that the
            # hits do not compete with gigabytes of writeback (sync is not counted as seeding).
            await trio.to_thread.run_sync(os.sync)
            # Right after a restart (the direct seeding's start is one): the proxies' work
            # after a start (nginx's cache loader, proxychain's index scan) runs meanwhile.
            rng = random.Random(n)
            sample = [scale_path(tag, rng.randrange(n)) for _ in range(SCALE_SAMPLE)]
            ready_s, first_hit_s = await _restart_until_hit(proxy, sample[0])
            indexed: list[float | str] = []
            async with trio.open_nursery() as nursery:
                if proxy.admin_port is not None:  # proxychain: when its disk index is whole
                    nursery.start_soon(_until_indexed, proxy, n, indexed)
                    nursery.start_soon(_py_spy, bench, proxy, hit_s, f"scale-{n}-restart")
                res = await run_load(HOST, proxy.port, sample, connections=8, duration=hit_s)
            _record(bench, "scale", name, f"{n}", res)
            figures: list[tuple[str, float | str]] = [
                ("seeded by", f"seed.py x{SEED_PROCESSES}" if direct else "requests"),
                ("seeding s", round(seed_s, 1)),
                ("restart: port open s", ready_s),
                ("restart: first HIT s", first_hit_s),
                ("hit p50 ms, after restart", res.p50_ms),
                ("hit p99 ms, after restart", res.p99_ms),
                ("hit share %", round(100 * res.x_cache.get("HIT", 0) / max(res.requests, 1), 1)),
            ]
            if indexed:  # proxychain: hits again, once the index is whole
                rng = random.Random(n + 1)
                again = [scale_path(tag, rng.randrange(n)) for _ in range(SCALE_SAMPLE)]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_py_spy, bench, proxy, hit_s, f"scale-{n}-indexed")
                    res2 = await run_load(HOST, proxy.port, again, connections=8, duration=hit_s)
                _record(bench, "scale", name, f"{n}-indexed", res2)
                figures += [
                    ("restart: disk index complete s", indexed[0]),
                    ("hit p99 ms, index complete", res2.p99_ms),
                ]
            figures.append(("RSS MiB, all processes", round(rss_kib(proxy.pid) / 1024, 1)))
            for metric, value in figures:
                values.setdefault(metric, {})[name] = value
        values = dict(sorted(values.items(), key=lambda mv: SCALE_METRICS.index(mv[0])))
        if "varnish" in bench.proxies:
            for v in values.values():
                v["varnish"] = "n/a (memory storage)"
        better = {
            "hit p50 ms, after restart": "lower",
            "hit p99 ms, after restart": "lower",
            "hit p99 ms, index complete": "lower",
            "restart: first HIT s": "lower",
        }
        scen = f"scale {n:,} entries on disk (512 B)"
        rows += table_rows(scen, values, better)
    return rows


SCALE_SAMPLE = 2000  # random seeded keys per hit run
SCALE_METRICS = (
    "seeded by",
    "seeding s",
    "restart: port open s",
    "restart: first HIT s",
    "hit p50 ms, after restart",
    "hit p99 ms, after restart",
    "hit share %",
    "restart: disk index complete s",
    "hit p99 ms, index complete",
    "RSS MiB, all processes",
)
SEED_PROCESSES = 2  # seed.py processes writing proxychain's cache at once (one per core)
SEED_TIMEOUT_S = 3600.0
INDEX_TIMEOUT_S = 600.0


async def _seed_requests(proxy: Managed, tag: str, start: int, stop: int) -> None:
    """Seed ``[start, stop)`` by requesting each key through ``proxy`` (any on-disk format)."""

    def keys() -> Iterator[str]:
        for i in range(start, stop):
            yield scale_path(tag, i)

    await run_load(
        HOST, proxy.port, keys, connections=16, requests=stop - start, request_timeout=10
    )


async def _seed_direct(bench: Bench, proxy: Managed, tag: str, start: int, stop: int) -> None:
    """Stop proxychain and write ``[start, stop)`` into its cache dir with :mod:`seed`
    (proxychain's own storage API), in :data:`SEED_PROCESSES` processes.

    Raises:
        RuntimeError: a seeder failed (its output is in the message).
    """
    proxy.stop()
    cache = targets.proxychain_cache_dir(bench.tmp)
    log = bench.tmp / "seed.log"
    argv = [sys.executable, str(targets.BENCH_DIR / "seed.py"), f"--cache-dir={cache}"]
    argv += [f"--tag={tag}", f"--start={start}", f"--stop={stop}", f"--shards={SEED_PROCESSES}"]
    argv += [f"--max-bytes={targets.CacheSizes().disk_gib * GIB}"]
    if not bench.seed_fsync:
        argv.append("--no-fsync")
    with trio.fail_after(SEED_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for shard in range(SEED_PROCESSES):
                nursery.start_soon(_run_seeder, [*argv, f"--shard={shard}"], log)


async def _run_seeder(argv: list[str], log: Path) -> None:
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    with log.open("ab") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"seed.py exited {done.returncode}: {done.stderr.decode()[-2000:]}")


async def _py_spy(bench: Bench, proxy: Managed, seconds: float, label: str) -> None:
    """With ``--profile``: ``py-spy record`` the proxy for ``seconds`` into
    ``bench/results/pyspy-<run>-<label>.txt`` (raw collapsed stacks, summarise them with
    ``bench/pyspy_top.py``). A py-spy that is missing or fails is reported, not fatal."""
    if bench.profile_dir is None:
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = bench.profile_dir / f"pyspy-{bench.run_id}-{label}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", f"--pid={proxy.pid}", f"--duration={max(1, round(seconds))}"]
    argv += ["--rate=200", "--format=raw", f"--output={out}", "--nonblocking"]
    try:
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    except OSError as exc:
        print(f"py-spy: {exc}", file=sys.stderr)
        return
    if done.returncode != 0:
        print(f"py-spy {label}: {done.stderr.decode(errors='replace')[-500:]}", file=sys.stderr)
    else:
        print(f"py-spy {label}: {out}", file=sys.stderr)


async def _until_indexed(proxy: Managed, n: int, out: list[float | str]) -> None:
    """Append the seconds from ``proxy``'s spawn until its disk tier has indexed ``n``
    entries (polling its admin stats every 0.25 s; bounded by :data:`INDEX_TIMEOUT_S`)."""
    assert proxy.admin_port is not None
    with trio.move_on_after(INDEX_TIMEOUT_S):
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError, trio.TooSlowError):
                stats = await _get_json(proxy.admin_port, "/admin/stats")
                disk = next(t for t in stats["tiers"] if t["name"] == "disk")
                if int(disk["entries"]) >= n:
                    out.append(round(time.perf_counter() - proxy.started_at, 2))
                    return
            await trio.sleep(0.25)
    out.append(f">{INDEX_TIMEOUT_S:g}")


async def _restart_until_hit(
    proxy: Managed, path: str, limit_s: float = 120.0
) -> tuple[float | str, float | str]:
    """Restart ``proxy`` and time (port open, first response that is a HIT) from the spawn."""
    proxy.stop()
    proxy.spawn()
    t0 = trio.current_time()
    try:
        await proxy.wait_ready(limit_s)
    except StartError:
        return "failed", "failed"
    ready = round(trio.current_time() - t0, 3)
    with trio.move_on_after(limit_s):
        while True:
            s = await fetch(HOST, proxy.port, path, timeout=5)
            if s.x_cache == "HIT":
                return ready, round(trio.current_time() - t0, 3)
            await trio.sleep(0.005)
    return ready, f">{limit_s:g}"


async def gomod(bench: Bench) -> list[Row]:
    """Cold and warm ``go mod download``: see :mod:`gomodbench`."""
    import gomodbench

    return await gomodbench.gomod(bench)


Scenario = Callable[[Bench], Awaitable[list[Row]]]
SCENARIOS: dict[str, Scenario] = {
    "hits": hits,
    "miss": miss,
    "herd": herd,
    "outage": outage,
    "swr": swr,
    "stream1g": stream1g,
    "scale": scale,
    "gomod": gomod,
}
