"""Fast seeding of proxychain's disk cache for the scale scenario, without requests.

Seeding a million entries by requesting each through the proxy takes about an hour; this
writes them straight into the cache directory with proxychain's own storage API while the
proxy is stopped: :func:`proxychain.disk.open_disk_tier`, ``DiskTier.open_writer``,
``DiskWriter.write`` and ``DiskWriter.commit`` (the same calls a fill makes, fsyncs and
renames included), so the on-disk format is proxychain's and nothing here re-implements it.
Each entry is what a fill of ``GET /bytes/512/<tag>-<i>`` through a ``prefix = "/"`` route
would store: the key from :func:`proxychain.keys.primary_key`, the origin's own response head
(:func:`origin.response_head`) reduced by :func:`proxychain.policy.stored_headers`, and the
origin's body (:mod:`payload`). The scale scenario checks the result: the proxy, started on
the seeded directory, must answer ``X-Cache: HIT`` for the seeded keys.

Several processes may seed one directory at once (the disk tier is multi-process safe), each
taking every ``--shards``-th index. ``--no-fsync`` turns ``os.fsync`` into a no-op in this
process and calls ``sync(2)`` once at the end instead: the files are the same and are on disk
when the seeder exits, in about half the time (a commit's three fsyncs are most of its cost on
ext4). Usage::

    python bench/seed.py --cache-dir DIR --tag T --start 0 --stop 1000000 --shard 0 --shards 2
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio
from origin import response_head
from payload import body_chunks, bytes_path, parse_origin_target

from proxychain import keys, policy
from proxychain.disk import DiskTier, open_disk_tier
from proxychain.entry import Entry
from proxychain.http import Headers, ResponseHead

__all__ = ["ENTRY_BYTES", "entry_for", "main", "scale_path", "seed"]

ENTRY_BYTES = 512
DEFAULT_CONCURRENCY = 8  # commits in flight per process (more only contends on ext4 locks)
DISK_THREADS = 8


def scale_path(tag: str, i: int) -> str:
    """The request target of the ``i``-th scale entry (what the scenario requests)."""
    return bytes_path(ENTRY_BYTES, f"{tag}-{i}")


def entry_for(path: str, now: float) -> tuple[Entry, bytes]:
    """The entry and body a fill of ``GET path`` from the bench origin stores, at ``now``.

    Raises:
        ValueError: ``path`` is not in the origin's grammar.
    """
    parsed = parse_origin_target(path)
    if parsed is None:
        raise ValueError(f"not an origin target: {path!r}")
    date = email.utils.formatdate(now, usegmt=True).encode()
    head = ResponseHead(status=200, headers=Headers.from_raw(response_head(parsed, date)))
    body = b"".join(bytes(chunk) for chunk in body_chunks(parsed.path, parsed.size))
    entry = Entry(
        key=keys.primary_key("GET", path),  # route prefix "/": the key URL is the target
        url=path,
        status=head.status,
        reason=head.reason,
        headers=policy.stored_headers(head, response_time=now),
        request_time=now,
        response_time=now,
    )
    return entry, body


async def _write_one(tier: DiskTier, path: str) -> None:
    entry, body = entry_for(path, time.time())
    writer = await tier.open_writer(entry.key, entry.variant)
    async with writer:
        await writer.write(body)
        await writer.commit(entry, expected_size=len(body))


async def seed(
    cache_dir: Path,
    paths: Iterator[str],
    *,
    max_bytes: int,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> int:
    """Commit an entry for every path in ``paths`` into the disk tier at ``cache_dir``;
    returns how many. Run it while no proxy uses ``cache_dir``'s budget (its evictions would
    race ours) - concurrent seeders are fine."""
    done = 0
    async with open_disk_tier(
        cache_dir,
        max_bytes=max_bytes,
        limiter=trio.CapacityLimiter(DISK_THREADS),
        rescan_interval=None,
    ) as tier:

        async def worker() -> None:
            nonlocal done
            for path in paths:  # one shared iterator: each path is taken once
                await _write_one(tier, path)
                done += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return done


def _no_fsync(fd: object) -> None:
    """``os.fsync`` for ``--no-fsync``: nothing (``os.sync`` runs once at the end)."""


def main(argv: list[str] | None = None) -> int:
    """CLI: seed ``[start, stop)`` (this shard's share) and print how many and how fast."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, required=True, help="proxychain's [cache] dir")
    ap.add_argument("--tag", required=True, help="key tag: entries are /bytes/512/<tag>-<i>")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, required=True)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--max-bytes", type=int, default=20 * 1024**3, help="the disk budget")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    ap.add_argument(
        "--no-fsync", action="store_true", help="no fsync per entry; one sync(2) at the end"
    )
    args = ap.parse_args(argv)
    if args.no_fsync:
        os.fsync = _no_fsync  # this process only: the disk tier calls os.fsync
    paths = (
        scale_path(args.tag, i)
        for i in range(args.start + args.shard, args.stop, max(1, args.shards))
    )
    t0 = time.perf_counter()
    n = trio.run(
        functools.partial(
            seed, args.cache_dir, paths, max_bytes=args.max_bytes, concurrency=args.concurrency
        )
    )
    if args.no_fsync:
        os.sync()
    elapsed = time.perf_counter() - t0
    print(f"seeded {n} entries in {elapsed:.1f} s ({n / max(elapsed, 1e-9):,.0f}/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
