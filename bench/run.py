"""Benchmark driver: proxychain against nginx proxy_cache, Varnish and the Python ceiling.

One run starts the origin and every available proxy on free loopback ports (configs and caches
in a temp dir), runs the selected scenarios against each in turn, prints one markdown table with
ratios of the subject (proxychain, or Varnish while proxychain cannot start) to nginx and to the
ceiling, and writes the table and raw figures as JSON to bench/results/. Every process it
started is stopped by PID in a ``finally``; every scenario is bounded in time.

Usage: ``bash bench/setup.sh && .venv/bin/python bench/run.py --scenario hits`` (see README).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import targets
import trio
from loadgen import PY_BOTTLENECK_NOTE, wrk_available
from procs import Managed, StartError, stop_all
from scenarios import HIT_SIZES, SCENARIOS, Bench, Row, ratio

__all__ = ["format_table", "main"]

RESULTS_DIR = targets.BENCH_DIR / "results"
COLUMNS = ("ceiling", "origin", "nginx", "varnish", "proxy.py", "proxychain")
ALL_PROXIES = ("nginx", "varnish", "proxy.py", "proxychain")
PASS_THROUGH = "proxy.py"  # no cache: only in the hits table, where it is a yardstick
DEFAULT_DURATION_S = 10.0
QUICK_DURATION_S = 2.0
SCALE_SIZES = (10_000, 100_000)


def _fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


def format_table(rows: list[Row], subject: str) -> str:
    """Markdown table: one column per target, then subject / nginx and subject / ceiling, and
    subject / proxy.py when a row has a proxy.py figure."""
    present = [c for c in COLUMNS if any(c in r.values for r in rows)]
    against = ["nginx", "ceiling"]
    if PASS_THROUGH in present and subject != PASS_THROUGH:
        against.append(PASS_THROUGH)
    head = ["scenario", "metric", *present, *(f"{subject} / {a}" for a in against)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = ""
    for r in rows:
        cells = [r.scenario if r.scenario != last else "", r.metric + _arrow(r.better)]
        cells += [_fmt(r.values[c]) if c in r.values else "" for c in present]
        rated = r.better != ""
        s = r.values.get(subject)
        cells += [ratio(s, r.values.get(a)) if rated else "" for a in against]
        lines.append("| " + " | ".join(cells) + " |")
        last = r.scenario
    return "\n".join(lines)


def _arrow(better: str) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(better, "")


async def _start_proxies(
    tmp: Path, origin_port: int, args: argparse.Namespace
) -> dict[str, Managed]:
    sizes = targets.CacheSizes()
    wanted = [t for t in args.targets.split(",") if t in ALL_PROXIES]
    if PASS_THROUGH in wanted and "hits" not in args.scenarios:
        wanted.remove(PASS_THROUGH)  # it has no cache: the other scenarios leave it out
        print(f"skip {PASS_THROUGH}: it has no cache and runs in hits only", file=sys.stderr)
    started: dict[str, Managed] = {}
    for name in wanted:
        managed: Managed | None
        hint = "run: bash bench/setup.sh"
        if name == "nginx":
            managed = targets.nginx(tmp, origin_port, sizes, args.nginx_workers)
        elif name == "varnish":
            managed = targets.varnish(tmp, origin_port, sizes)
        elif name == PASS_THROUGH:
            managed = targets.proxypy(tmp, origin_port, args.proxy_workers)
            hint = "the PyPI package proxy.py; run: .venv/bin/pip install -e '.[bench]'"
        else:
            managed = targets.proxychain(tmp, origin_port, sizes, args.proxy_workers)
        if managed is None:
            print(f"skip {name}: not installed ({hint})", file=sys.stderr)
            continue
        try:
            await managed.start(timeout=args.start_timeout)
        except StartError as exc:
            print(f"skip {name}: it did not start.\n{exc}", file=sys.stderr)
            continue
        started[name] = managed
        print(f"started {name} on 127.0.0.1:{managed.port} (pid {managed.pid})", file=sys.stderr)
    return started


async def _amain(args: argparse.Namespace, tmp: Path) -> int:
    """Run the bench; SIGINT/SIGTERM cancel it cleanly (the caller then stops every child)."""
    status = 130
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    print(f"\n{signal.Signals(signum).name}: stopping", file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return

            async def work() -> None:
                nonlocal status
                status = await _bench(args, tmp)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
    return status


async def _bench(args: argparse.Namespace, tmp: Path) -> int:
    load_before = os.getloadavg()[0]
    origin = targets.origin(tmp)
    await origin.start()
    proxies = await _start_proxies(tmp, origin.port, args)
    if not proxies:
        print("no proxy started; nothing to compare", file=sys.stderr)
    scale_sizes = (1000,) if args.quick else SCALE_SIZES
    if args.scale_1m:
        scale_sizes = (*scale_sizes, 1_000_000)
    bench = Bench(
        tmp=tmp,
        origin=origin,
        proxies=proxies,
        run_id=f"{int(time.time()):x}",
        quick=args.quick,
        duration=args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S),
        connections=args.connections,
        ceiling_processes=args.ceiling_processes,
        use_wrk=not args.python_load,
        scale_sizes=scale_sizes,
        hit_sizes=args.hit_sizes,
        proxy_workers=args.proxy_workers,
        nginx_workers=args.nginx_workers,
        gomod_runs=args.gomod_runs,
        scale_seed=args.scale_seed,
        seed_fsync=args.seed_fsync,
        profile_dir=RESULTS_DIR if args.profile else None,
    )
    rows: list[Row] = []
    for name in args.scenarios:
        print(f"scenario {name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        with trio.move_on_after(args.scenario_timeout) as scope:
            rows += await SCENARIOS[name](bench)
        if scope.cancelled_caught:
            print(f"scenario {name}: timed out after {args.scenario_timeout:g} s", file=sys.stderr)
        print(f"scenario {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    subject = next(
        (p for p in ("proxychain", "varnish", "nginx", PASS_THROUGH) if p in proxies), "nginx"
    )
    table = format_table(rows, subject)
    print()
    print(table)
    notes = _notes(bench, load_before)
    for note in notes:
        print(f"\n* {note}")
    _write_json(args, bench, rows, table, notes)
    return 0


def _notes(bench: Bench, load_before: float) -> list[str]:
    busy = " (other work was running: figures are noisy)" if load_before > 0.5 else ""
    notes = [
        f"Servers and load generator share {os.cpu_count()} CPUs; "
        f"1-min load average before the run {load_before:.2f}{busy}."
    ]
    if not (bench.use_wrk and wrk_available()):
        notes.append(PY_BOTTLENECK_NOTE)
    if "proxychain" not in bench.proxies:
        notes.append("proxychain did not start: ratios use the subject named in the header.")
    return notes


def _write_json(
    args: argparse.Namespace, bench: Bench, rows: list[Row], table: str, notes: list[str]
) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"{stamp}{'-quick' if args.quick else ''}.json"
    doc = {
        "run_id": bench.run_id,
        "args": dict(vars(args)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
        "targets": sorted(bench.proxies),
        "tools": {
            "wrk": shutil.which("wrk"),
            "nginx": shutil.which("nginx"),
            "varnishd": shutil.which("varnishd"),
            "proxy.py": targets.proxypy_version(),
            "go": shutil.which("go"),
        },
        "rows": [asdict(r) for r in rows],
        "raw": bench.raw,
        "table": table,
        "notes": notes,
    }
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nresults: {out.relative_to(targets.BENCH_DIR.parent)}", file=sys.stderr)


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "k": 1024, "mib": 1024**2, "m": 1024**2}


def _sizes(text: str) -> tuple[int, ...]:
    """``"1KiB,64KiB"`` -> ``(1024, 65536)`` (units: none/B, KiB/K, MiB/M)."""
    out = []
    for part in text.split(","):
        number = part.strip().rstrip("BbIiKkMm")
        unit = part.strip()[len(number) :].lower()
        if not number.isdigit() or unit not in _SIZE_UNITS:
            raise argparse.ArgumentTypeError(f"not a size: {part!r} (e.g. 1KiB, 64KiB, 1MiB)")
        out.append(int(number) * _SIZE_UNITS[unit])
    return tuple(out)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scenario",
        default=None,
        help=f"comma-separated, or 'all': {','.join(SCENARIOS)} (default hits; --quick: all)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, ~2 s runs: smoke-test the harness"
    )
    ap.add_argument(
        "--targets",
        default=",".join(ALL_PROXIES),
        help="proxies to start (ceiling always runs in hits)",
    )
    ap.add_argument(
        "--hit-sizes",
        type=_sizes,
        default=HIT_SIZES,
        help="body sizes of the hits scenario (default 1KiB,64KiB,1MiB,32MiB)",
    )
    ap.add_argument("--duration", type=float, default=None, help="seconds per throughput run")
    ap.add_argument("--connections", type=int, default=32, help="connections for small-body runs")
    ap.add_argument(
        "--ceiling-processes", type=int, default=2, help="SO_REUSEPORT processes of the ceiling"
    )
    ap.add_argument("--nginx-workers", type=int, default=2)
    ap.add_argument(
        "--proxy-workers", type=int, default=1, help="proxychain --workers (passed when > 1)"
    )
    ap.add_argument(
        "--python-load", action="store_true", help="use the Python client even if wrk exists"
    )
    ap.add_argument(
        "--scale-1m", action="store_true", help="add a 1,000,000-entry step to scale (slow)"
    )
    ap.add_argument(
        "--scale-seed",
        choices=("direct", "requests"),
        default="direct",
        help="how scale seeds proxychain: bench/seed.py into its cache dir, or requests",
    )
    ap.add_argument("--seed-fsync", action="store_true", help="seed.py fsyncs every entry (slower)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record proxychain during scale's hit runs (bench/results/pyspy-*.txt)",
    )
    ap.add_argument(
        "--gomod-runs", type=int, default=3, help="repetitions of the gomod scenario (median)"
    )
    ap.add_argument(
        "--start-timeout", type=float, default=20.0, help="seconds for a server to listen"
    )
    ap.add_argument(
        "--scenario-timeout", type=float, default=1800.0, help="bound on one scenario, seconds"
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs, logs and caches")
    args = ap.parse_args(argv)
    chosen = args.scenario or ("all" if args.quick else "hits")
    args.scenarios = list(SCENARIOS) if chosen == "all" else chosen.split(",")
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = _parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="proxychain-bench-"))
    try:
        return trio.run(functools.partial(_amain, args, tmp))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
