"""Load generation: a trio + h11 client of our own, and an adapter for ``wrk``.

The Python generator opens ``connections`` keep-alive connections and has each one send
requests back to back (closed loop: a new request leaves when the previous answer has been read
in full), for a fixed ``duration`` or until ``requests`` answers have come back. Per request it
records the latency to the end of the body, the time to the response head ("first byte"), the
status, the ``X-Cache`` outcome, and optionally checks the body against :mod:`payload`.
Connection errors, timeouts and protocol errors are counted, and the connection is reopened.

"First byte" is the time from the request leaving the client to the first byte of the answer
reaching the client's socket, read from the kernel's receive timestamp (``SO_TIMESTAMPNS``), so
that a client busy reading other bodies (a herd of 500 on 2 cores) does not add its own delay
to the server's; ``first_byte_seen`` is the same span ending when the client task got to the
head, as a client program would see it. Without timestamps (not Linux) both are the latter.

On 2 cores a Python client spends more CPU per request than the server under test, so for
small responses it measures itself: :data:`PY_BOTTLENECK_NOTE`. ``wrk`` (C, epoll) does not have
that problem; :func:`run_wrk` runs it and parses its ``--latency`` report, and the driver
prefers it for throughput runs when it is installed. wrk cannot report ``X-Cache``, so the
driver reads the hit ratio from the origin's request counter instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import shutil
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import count

import h11
import trio
from payload import BodyCheck

__all__ = [
    "PY_BOTTLENECK_NOTE",
    "LoadResult",
    "Sample",
    "fetch",
    "percentile",
    "run_load",
    "run_wrk",
    "summarise",
    "wrk_available",
]

RECEIVE_BYTES = 256 * 1024
# Linux's SO_TIMESTAMPNS (asm-generic/socket.h; Python does not name it): each received
# packet's kernel arrival time, as a struct timespec on CLOCK_REALTIME in a control message.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
DEFAULT_REQUEST_TIMEOUT_S = 30.0
RECONNECT_PAUSE_S = 0.01  # after a failed connect, so a dead target is not spun on
PY_BOTTLENECK_NOTE = (
    "python load generator: for small bodies it saturates a core before the server does; "
    "figures are a floor (install wrk: bash bench/setup.sh)"
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One completed (or failed) request."""

    status: int  # 0 for a transport error
    latency_s: float
    first_byte_s: float
    first_byte_seen_s: float
    body_bytes: int
    x_cache: str
    body_ok: bool
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    """Summary of a load run; times in milliseconds, rates per second."""

    tool: str
    requests: int
    errors: int
    duration_s: float
    req_per_s: float
    mib_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    first_byte_p50_ms: float = 0.0
    first_byte_p99_ms: float = 0.0
    first_byte_seen_p50_ms: float = 0.0
    first_byte_seen_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    x_cache: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    bad_bodies: int = 0
    latency_by_cache_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def summarise(samples: Sequence[Sample], duration_s: float, *, tool: str = "python") -> LoadResult:
    """Reduce samples to a :class:`LoadResult`."""
    done = [s for s in samples if not s.error]
    lat = sorted(s.latency_s * 1e3 for s in done)
    fb = sorted(s.first_byte_s * 1e3 for s in done)
    fb_seen = sorted(s.first_byte_seen_s * 1e3 for s in done)
    by_cache: dict[str, list[float]] = {}
    for s in done:
        by_cache.setdefault(s.x_cache or "-", []).append(s.latency_s * 1e3)
    total_bytes = sum(s.body_bytes for s in done)
    errors = [s for s in samples if s.error or not s.body_ok or not 200 <= s.status < 400]
    duration_s = max(duration_s, 1e-9)
    mean_body = total_bytes / len(done) if done else 0
    return LoadResult(
        tool=tool,
        requests=len(done),
        errors=len(errors),
        duration_s=round(duration_s, 3),
        req_per_s=round(len(done) / duration_s, 1),
        mib_per_s=round(total_bytes / duration_s / 2**20, 1),
        p50_ms=round(percentile(lat, 50), 3),
        p90_ms=round(percentile(lat, 90), 3),
        p99_ms=round(percentile(lat, 99), 3),
        max_ms=round(lat[-1], 3) if lat else 0.0,
        first_byte_p50_ms=round(percentile(fb, 50), 3),
        first_byte_p99_ms=round(percentile(fb, 99), 3),
        first_byte_seen_p50_ms=round(percentile(fb_seen, 50), 3),
        first_byte_seen_p99_ms=round(percentile(fb_seen, 99), 3),
        statuses=dict(Counter(str(s.status) for s in done)),
        x_cache=dict(Counter(s.x_cache or "-" for s in done)),
        error_kinds=dict(Counter(s.error for s in samples if s.error)),
        bad_bodies=sum(not s.body_ok for s in done),
        latency_by_cache_ms={
            k: {
                "p50": round(percentile(sorted(v), 50), 3),
                "p99": round(percentile(sorted(v), 99), 3),
            }
            for k, v in by_cache.items()
        },
        note=PY_BOTTLENECK_NOTE if tool == "python" and mean_body < 64 * 1024 else "",
    )


class _Budget:
    """Shared stop rule: a deadline and/or a number of requests to hand out."""

    def __init__(self, deadline: float | None, requests: int | None) -> None:
        self.deadline = deadline
        self.remaining = requests

    def take(self) -> bool:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


async def _one_connection(
    host: str,
    port: int,
    paths: Iterator[str],
    budget: _Budget,
    samples: list[Sample],
    *,
    check_bodies: bool,
    request_timeout: float,
    method: str,
) -> None:
    stream: trio.SocketStream | None = None
    conn = h11.Connection(h11.CLIENT)
    host_header = f"{host}:{port}".encode()
    try:
        while budget.take():
            path = next(paths)
            t0 = time.perf_counter()
            try:
                with trio.fail_after(request_timeout):
                    if stream is None:
                        stream = await _open(host, port)
                        conn = h11.Connection(h11.CLIENT)
                    sample, conn = await _exchange(
                        stream, conn, path, host_header, t0, check_bodies, method
                    )
            except _Done as done:
                samples.append(done.sample)
                if stream is not None:
                    await _close(stream)
                stream = None
                continue
            except (OSError, trio.BrokenResourceError, h11.ProtocolError, trio.TooSlowError) as exc:
                kind = type(exc).__name__
                samples.append(_failed(t0, kind))
                if stream is not None:
                    await _close(stream)
                else:
                    await trio.sleep(RECONNECT_PAUSE_S)
                stream = None
                continue
            samples.append(sample)
            if conn.our_state is h11.IDLE:
                pass  # a fresh state after a body read off the socket (see _exchange)
            elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                await _close(stream)
                stream = None
    finally:
        if stream is not None:
            await _close(stream)


def _failed(t0: float, kind: str) -> Sample:
    dt = time.perf_counter() - t0
    return Sample(
        status=0,
        latency_s=dt,
        first_byte_s=dt,
        first_byte_seen_s=dt,
        body_bytes=0,
        x_cache="",
        body_ok=False,
        error=kind,
    )


async def _open(host: str, port: int) -> trio.SocketStream:
    """A connection with kernel receive timestamps on, where the platform has them."""
    stream = await trio.open_tcp_stream(host, port)
    with contextlib.suppress(OSError):  # without: first byte as the client sees it
        stream.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return stream


async def _receive_stamped(stream: trio.SocketStream) -> tuple[bytes, float | None]:
    """The next bytes, and the wall-clock time the kernel received them (None: unknown)."""
    data, ancdata, _flags, _addr = await stream.socket.recvmsg(
        RECEIVE_BYTES, socket.CMSG_SPACE(_TIMESPEC.size)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
            return data, sec + nsec / 1e9
    return data, None


async def _close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await stream.aclose()


async def _exchange(
    stream: trio.SocketStream,
    conn: h11.Connection,
    path: str,
    host_header: bytes,
    t0: float,
    check_bodies: bool,
    method: str,
) -> tuple[Sample, h11.Connection]:
    """One request; returns its sample and the h11 state for the connection's next request."""
    request = h11.Request(method=method, target=path, headers=[(b"host", host_header)])
    sent_wall, sent = time.time(), time.perf_counter()
    await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status, x_cache, first_byte, first_seen, received = 0, "", 0.0, 0.0, 0
    arrived: float | None = None  # the kernel's receive time of the answer's first bytes
    stamped = False
    check: BodyCheck | None = None
    keep_alive = True

    def sample() -> Sample:
        return Sample(
            status=status,
            latency_s=time.perf_counter() - t0,
            first_byte_s=first_byte,
            first_byte_seen_s=first_seen,
            body_bytes=received,
            x_cache=x_cache,
            body_ok=check.complete() if check is not None else True,
        )

    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if stamped:
                data = await stream.receive_some(RECEIVE_BYTES)
            else:
                data, arrived = await _receive_stamped(stream)
                stamped = True
            if not data:
                raise trio.BrokenResourceError("peer closed mid-response")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            first_seen = time.perf_counter() - sent
            first_byte = first_seen if arrived is None else max(0.0, arrived - sent_wall)
            status = event.status_code
            x_cache = ""
            size = -1
            for name, value in event.headers:
                if name == b"x-cache":
                    x_cache = value.decode("latin-1").upper()
                elif name == b"content-length":
                    size = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    keep_alive = False
            keep_alive = keep_alive and event.http_version == b"1.1"
            if check_bodies and status == 200 and method == "GET" and size >= 0:
                check = BodyCheck(path, size)
            if size > 0 and method == "GET" and status >= 200 and status not in (204, 304):
                # A body of known length is read straight off the socket: through h11 each
                # byte would be copied twice more, and on 2 shared cores a herd of clients
                # reading big bodies would measure the client's own copying.
                received = await _read_body(stream, conn.trailing_data[0], size, check)
                if not keep_alive:
                    raise _Done(sample())
                return sample(), h11.Connection(h11.CLIENT)
        elif isinstance(event, h11.Data):
            received += len(event.data)
            if check is not None:
                check.feed(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return sample(), conn
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("connection closed before the response ended")
        elif isinstance(event, h11.InformationalResponse):
            continue


async def _read_body(
    stream: trio.SocketStream, buffered: bytes, size: int, check: BodyCheck | None
) -> int:
    """Read the rest of a ``size``-byte body (``buffered`` already arrived); bytes read."""
    received = 0
    data = buffered
    while True:
        if len(data) > size - received:
            raise h11.RemoteProtocolError("more data than the body's Content-Length")
        received += len(data)
        if check is not None and data:
            check.feed(data)
        if received == size:
            return received
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise trio.BrokenResourceError("peer closed mid-response")


class _Done(Exception):
    """A response that ends its connection (``Connection: close``), read in full."""

    def __init__(self, sample: Sample) -> None:
        super().__init__("connection: close")
        self.sample = sample


async def run_load(
    host: str,
    port: int,
    paths: Callable[[], Iterator[str]] | Sequence[str],
    *,
    connections: int = 32,
    duration: float | None = None,
    requests: int | None = None,
    check_bodies: bool = False,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    method: str = "GET",
) -> LoadResult:
    """Drive ``connections`` closed-loop keep-alive connections at ``host:port``.

    Args:
        paths: targets to request, cycled (a sequence) or drawn from one shared iterator (a
            factory, called once: e.g. distinct keys for a miss run).
        duration: stop issuing after this many seconds; in-flight requests still finish.
        requests: stop after this many requests in total.
        check_bodies: verify each 200 body against :mod:`payload`.

    Returns:
        the summary (raw samples are not kept).
    """
    if duration is None and requests is None:
        raise ValueError("give a duration or a request count")
    shared = paths() if callable(paths) else _cycle(list(paths))
    samples: list[Sample] = []
    start = time.perf_counter()
    budget = _Budget(start + duration if duration is not None else None, requests)
    # Each connection works sequentially, so this bounds the run even if every request stalls.
    rounds = 1 if duration is not None else -(-(requests or 0) // connections)
    hard_limit = (duration or 0.0) + request_timeout * rounds + 1.0
    worker = functools.partial(
        _one_connection,
        host,
        port,
        shared,
        budget,
        samples,
        check_bodies=check_bodies,
        request_timeout=request_timeout,
        method=method,
    )
    with trio.move_on_after(hard_limit):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(worker)
    return summarise(samples, time.perf_counter() - start)


def _cycle(paths: list[str]) -> Iterator[str]:
    if not paths:
        raise ValueError("no paths")
    for i in count():
        yield paths[i % len(paths)]


async def fetch(
    host: str, port: int, path: str, *, timeout: float = DEFAULT_REQUEST_TIMEOUT_S
) -> Sample:
    """One request on a fresh connection; transport failures come back as an error sample."""
    t0 = time.perf_counter()
    try:
        with trio.fail_after(timeout):
            stream = await _open(host, port)
            try:
                conn = h11.Connection(h11.CLIENT)
                sample, _ = await _exchange(
                    stream, conn, path, f"{host}:{port}".encode(), t0, True, "GET"
                )
                return sample
            finally:
                await _close(stream)
    except _Done as done:  # Connection: close, the body read in full
        return done.sample
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, trio.TooSlowError) as exc:
        return _failed(t0, type(exc).__name__)


def wrk_available() -> bool:
    """True if ``wrk`` is on PATH."""
    return shutil.which("wrk") is not None


async def run_wrk(
    url: str, *, connections: int = 32, duration: float = 10.0, threads: int = 1
) -> LoadResult:
    """Run ``wrk --latency`` against ``url`` and parse its report (bounded in time)."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        f"{round(DEFAULT_REQUEST_TIMEOUT_S)}s",
        "--latency",
        url,
    ]
    with trio.fail_after(duration + DEFAULT_REQUEST_TIMEOUT_S + 10):
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return parse_wrk(out)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    return float(m.group(1)) * _TIME_UNITS[m.group(2)] if m else 0.0


def parse_wrk(out: str) -> LoadResult:
    """Parse the text report of ``wrk --latency``."""
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)([KMGT]?)B read", out)
    if done is None:
        raise ValueError(f"unrecognised wrk output:\n{out}")
    requests = int(done.group(1))
    duration = float(done.group(2)) * _TIME_UNITS.get(done.group(3), 1e3) / 1e3
    read_bytes = float(done.group(4)) * _UNITS[done.group(5)]
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.MULTILINE))
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    kinds: dict[str, int] = {}
    if non2xx:
        kinds["non-2xx/3xx"] = int(non2xx.group(1))
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                kinds[name] = int(value)
                errors += int(value)
    return LoadResult(
        tool="wrk",
        requests=requests,
        errors=errors,
        duration_s=duration,
        req_per_s=round(requests / duration, 1) if duration else 0.0,
        mib_per_s=round(read_bytes / duration / 2**20, 1) if duration else 0.0,
        p50_ms=_ms(dist.get("50", "")),
        p90_ms=_ms(dist.get("90", "")),
        p99_ms=_ms(dist.get("99", "")),
        max_ms=_ms(lat.group(3)) if lat else 0.0,
        error_kinds=kinds,
    )


def main() -> None:
    """CLI: ``python bench/loadgen.py http://127.0.0.1:8080/bytes/1024 -c 32 -d 5``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("-c", "--connections", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=None)
    ap.add_argument("-n", "--requests", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="verify bodies against payload")
    ap.add_argument("--wrk", action="store_true", help="use wrk instead (duration only)")
    args = ap.parse_args()
    m = re.fullmatch(r"http://([^/:]+):(\d+)(/.*)?", args.url)
    if m is None:
        ap.error("url must be http://HOST:PORT/path")
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    if args.wrk:
        wrk = functools.partial(
            run_wrk, args.url, connections=args.connections, duration=args.duration or 10
        )
        result = trio.run(wrk)
    else:
        duration = args.duration if args.duration or args.requests else 10.0
        load = functools.partial(
            run_load,
            host,
            port,
            [path],
            connections=args.connections,
            duration=duration,
            requests=args.requests,
            check_bodies=args.check,
        )
        result = trio.run(load)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
