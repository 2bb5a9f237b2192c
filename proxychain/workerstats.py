"""``/admin/stats`` for the whole server when workers share a port.

Theory of operation:

* Under ``--workers N`` every worker has its own route counters, memory tier and breakers,
  and only worker 0 serves the admin plane. Each worker writes its own stats document (the
  shape of :func:`proxychain.status.build_stats`) to the workers' shared directory once a
  second, as ``stats-<pid>.json`` replaced atomically, and reads its siblings' back, in one
  worker-thread call (:class:`SiblingStats`).
* The document served merges its own figures with the siblings' (:func:`merge_stats`, pure):
  route counters and memory tiers add up, an upstream shows its worst breaker state among
  the workers, recent errors interleave by time, and the hit-ratio history averages the
  workers' samples per interval (connections are spread evenly, so the plain mean is fair).
  ``workers`` says how many documents were merged.
* A sibling's document older than :data:`STALE_AFTER_S` is left out (a worker that died; the
  supervisor also removes its file, :func:`forget_worker`), so figures lag by at most about
  :data:`SHARE_INTERVAL_S` and a dead worker's counts drop out of the sum.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .observe import HISTORY_INTERVAL, HISTORY_POINTS, RECENT_ERRORS

__all__ = [
    "SHARE_INTERVAL_S",
    "STALE_AFTER_S",
    "SiblingStats",
    "forget_worker",
    "merge_stats",
]

log = logging.getLogger("proxychain.workerstats")

SHARE_INTERVAL_S = 1.0  # how often a worker publishes its figures and reads its siblings'
STALE_AFTER_S = 5.0  # a sibling's document older than this is a dead worker's
_BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}
_ROUTE_COUNTERS = ("requests", "hits", "bytes_sent", "stale", "coalesced", "errors")

Stats = dict[str, Any]


def _path(directory: Path, pid: int) -> Path:
    return directory / f"stats-{pid}.json"


class SiblingStats:
    """Publishes this worker's figures and keeps its siblings' latest ones."""

    def __init__(self, directory: Path, own: Callable[[], Stats], pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._own = own
        self.siblings: list[Stats] = []

    async def run(self) -> None:
        """Share every :data:`SHARE_INTERVAL_S` until cancelled; the file goes at the end."""
        try:
            while True:
                document = self._own()
                self.siblings = await trio.to_thread.run_sync(
                    _exchange, self.directory, self.pid, document
                )
                await trio.sleep(SHARE_INTERVAL_S)
        finally:
            # On the way out (no more awaiting): one unlink of a small file.
            forget_worker(self.directory, self.pid)

    def merged(self) -> Stats:
        """This worker's figures merged with its siblings' latest."""
        return merge_stats(self._own(), self.siblings)


def _exchange(directory: Path, pid: int, document: Stats) -> list[Stats]:
    """Write ``document`` as ``pid``'s, and read every sibling's fresh one (blocking)."""
    target = _path(directory, pid)
    tmp = target.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(document))
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("cannot share this worker's figures in %s: %s", directory, exc)
    now = document.get("generated_at", 0.0)
    siblings = []
    for path in directory.glob("stats-*.json"):
        if path == target:
            continue
        try:
            sibling = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # gone meanwhile, or a file this version does not know
        if isinstance(sibling, dict) and now - sibling.get("generated_at", 0.0) <= STALE_AFTER_S:
            siblings.append(sibling)
    return siblings


def forget_worker(directory: Path, pid: int) -> None:
    """Remove ``pid``'s shared figures (a worker that stopped or died)."""
    with contextlib.suppress(OSError):
        _path(directory, pid).unlink()


def merge_stats(own: Stats, siblings: list[Stats]) -> Stats:
    """One stats document for the server: ``own`` (it keeps its node, time and disk tier)
    with the ``siblings``' figures merged in."""
    documents = [own, *siblings]
    merged = dict(own)
    merged["workers"] = len(documents)
    merged["routes"] = _merge_routes(documents)
    merged["upstreams"] = _merge_upstreams(documents)
    merged["tiers"] = _merge_tiers(documents)
    errors = [e for d in documents for e in d.get("recent_errors", [])]
    errors.sort(key=lambda e: e.get("at", 0.0))
    merged["recent_errors"] = errors[-RECENT_ERRORS:]
    merged["hit_ratio_history"] = _merge_history(documents)
    return merged


def _merge_routes(documents: list[Stats]) -> list[Stats]:
    routes: dict[str, Stats] = {}
    for document in documents:
        for route in document.get("routes", []):
            into = routes.get(route["name"])
            if into is None:
                routes[route["name"]] = dict(route)
                continue
            for name in _ROUTE_COUNTERS:
                into[name] = into.get(name, 0) + route.get(name, 0)
    for route in routes.values():
        requests = route.get("requests", 0)
        route["hit_ratio"] = round(route.get("hits", 0) / requests, 4) if requests else 0.0
    return list(routes.values())


def _merge_upstreams(documents: list[Stats]) -> list[Stats]:
    upstreams: dict[tuple[str, str], Stats] = {}
    for document in documents:
        for upstream in document.get("upstreams", []):
            key = (upstream["route"], upstream["name"])
            into = upstreams.get(key)
            if into is None:
                upstreams[key] = dict(upstream)
                continue
            into["requests"] = into.get("requests", 0) + upstream.get("requests", 0)
            into["failures"] = max(into.get("failures", 0), upstream.get("failures", 0))
            if _BREAKER_RANK.get(upstream["state"], 0) > _BREAKER_RANK.get(into["state"], 0):
                into["state"] = upstream["state"]
            probes = [p for p in (into.get("next_probe_at"), upstream.get("next_probe_at")) if p]
            into["next_probe_at"] = min(probes) if probes else None
    return list(upstreams.values())


def _merge_tiers(documents: list[Stats]) -> list[Stats]:
    tiers = [dict(tier) for tier in documents[0].get("tiers", [])]
    for tier in tiers:
        if tier["name"] != "memory":
            continue  # the disk tier is one, shared: every worker sees the same
        for document in documents[1:]:
            for other in document.get("tiers", []):
                if other["name"] == "memory":
                    for name in ("bytes", "entries", "budget"):
                        tier[name] = tier.get(name, 0) + other.get(name, 0)
    return tiers


def _merge_history(documents: list[Stats]) -> list[list[float]]:
    """Each interval's hit ratio, averaged over the workers that sampled one in it."""
    buckets: dict[int, list[tuple[float, float]]] = {}
    for document in documents:
        for at, ratio in document.get("hit_ratio_history", []):
            buckets.setdefault(int(at // HISTORY_INTERVAL), []).append((at, ratio))
    history = []
    for bucket in sorted(buckets):
        points = buckets[bucket]
        latest = max(at for at, _ in points)
        history.append([latest, round(sum(r for _, r in points) / len(points), 4)])
    return history[-HISTORY_POINTS:]
