"""Workers' stats documents: shared through files, merged for the admin plane."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from proxychain.observe import HISTORY_INTERVAL
from proxychain.workerstats import (
    STALE_AFTER_S,
    SiblingStats,
    _exchange,
    forget_worker,
    merge_stats,
)

NOW = 1_700_000_000.0


def document(
    *,
    at: float = NOW,
    requests: int = 10,
    hits: int = 5,
    state: str = "closed",
    next_probe_at: float | None = None,
    memory: int = 100,
    errors: tuple[float, ...] = (),
    history: tuple[tuple[float, float], ...] = (),
) -> dict[str, Any]:
    return {
        "generated_at": at,
        "node": "n",
        "routes": [
            {
                "name": "/go/",
                "kind": "goproxy",
                "requests": requests,
                "hits": hits,
                "hit_ratio": hits / requests,
                "bytes_sent": 1000,
                "stale": 1,
                "coalesced": 2,
                "errors": 0,
            }
        ],
        "upstreams": [
            {
                "name": "http://up",
                "route": "/go/",
                "state": state,
                "failures": 3 if state != "closed" else 0,
                "requests": 7,
                "next_probe_at": next_probe_at,
            }
        ],
        "tiers": [
            {"name": "memory", "bytes": memory, "entries": 1, "budget": 1000},
            {"name": "disk", "bytes": 5000, "entries": 9, "budget": 10_000},
        ],
        "recent_errors": [{"at": t, "route": "/go/", "message": f"e{t}"} for t in errors],
        "hit_ratio_history": [list(p) for p in history],
    }


def test_alone_the_document_is_its_own() -> None:
    own = document()
    merged = merge_stats(own, [])
    assert merged == {**own, "workers": 1}


def test_route_counters_and_memory_tiers_add_up_the_disk_tier_is_one() -> None:
    merged = merge_stats(document(requests=10, hits=5), [document(requests=30, hits=27)])
    (route,) = merged["routes"]
    assert (route["requests"], route["hits"], route["hit_ratio"]) == (40, 32, 0.8)
    assert (route["bytes_sent"], route["stale"], route["coalesced"]) == (2000, 2, 4)
    memory, disk = merged["tiers"]
    assert (memory["bytes"], memory["entries"], memory["budget"]) == (200, 2, 2000)
    assert (disk["bytes"], disk["entries"], disk["budget"]) == (5000, 9, 10_000)
    assert merged["workers"] == 2


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (("closed", "closed"), "closed"),
        (("closed", "half_open"), "half_open"),
        (("open", "half_open"), "open"),
        (("closed", "open"), "open"),
    ],
)
def test_an_upstream_shows_its_worst_breaker_among_the_workers(
    states: tuple[str, str], expected: str
) -> None:
    probes = {"closed": None, "half_open": NOW + 2, "open": NOW + 5}
    own, other = (document(state=s, next_probe_at=probes[s]) for s in states)
    (upstream,) = merge_stats(own, [other])["upstreams"]
    assert upstream["state"] == expected
    assert upstream["requests"] == 14
    expected_probe = min((p for p in (probes[s] for s in states) if p), default=None)
    assert upstream["next_probe_at"] == expected_probe


def test_recent_errors_interleave_by_time_and_history_averages_per_interval() -> None:
    step = HISTORY_INTERVAL
    own = document(errors=(1.0, 5.0), history=((NOW, 0.5), (NOW + step, 0.7)))
    other = document(errors=(3.0,), history=((NOW + 1, 0.9),))
    merged = merge_stats(own, [other])
    assert [e["at"] for e in merged["recent_errors"]] == [1.0, 3.0, 5.0]
    assert merged["hit_ratio_history"] == [[NOW + 1, 0.7], [NOW + step, 0.7]]


def test_exchange_writes_ours_and_reads_fresh_siblings_only(tmp_path: Path) -> None:
    (tmp_path / "stats-2.json").write_text(json.dumps(document(requests=2)))
    (tmp_path / "stats-3.json").write_text(json.dumps(document(at=NOW - STALE_AFTER_S - 1)))
    (tmp_path / "stats-4.json").write_text("{not json")
    (tmp_path / "other.db").write_text("prometheus-client's")
    siblings = _exchange(tmp_path, 1, document())
    assert [s["routes"][0]["requests"] for s in siblings] == [2]
    assert json.loads((tmp_path / "stats-1.json").read_text()) == document()
    assert not list(tmp_path.glob("*.tmp"))
    forget_worker(tmp_path, 1)
    forget_worker(tmp_path, 1)  # already gone: fine
    assert not (tmp_path / "stats-1.json").exists()


async def test_sibling_stats_share_until_cancelled_then_remove_their_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "stats-2.json").write_text(json.dumps(document(requests=30, hits=27)))
    sharing = SiblingStats(tmp_path, lambda: document(requests=10, hits=5), pid=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sharing.run)
        with trio.fail_after(5):
            while not sharing.siblings:
                await trio.sleep(0.01)
        assert (tmp_path / "stats-1.json").exists()
        assert sharing.merged()["routes"][0]["requests"] == 40
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "stats-1.json").exists()
