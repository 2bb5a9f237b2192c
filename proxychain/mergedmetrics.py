"""Metrics merged across worker processes: prometheus-client's multi-process mode.

With ``--workers N`` every worker counts on its own, and whichever one serves ``/metrics``
must show the sum. prometheus-client keeps per-process values in mmap files when the
environment variable ``PROMETHEUS_MULTIPROC_DIR`` names an empty, writable directory *before*
``prometheus_client`` is first imported (it picks its value class at import time). The
supervisor therefore sets that variable (and wipes the directory) before starting the
workers; each worker checks the mode is really on (:func:`multiprocess_enabled`) and scrapes
a registry that merges all workers' files (:func:`merged_registry`): counters and histograms
are summed. When a worker exits, the supervisor calls :func:`mark_worker_dead` so its live
gauges disappear.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, values
from prometheus_client import multiprocess as prom_multiprocess

from .errors import ConfigError

__all__ = ["MULTIPROC_DIR_ENV", "mark_worker_dead", "merged_registry", "multiprocess_enabled"]

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    """Whether prometheus-client was imported with ``PROMETHEUS_MULTIPROC_DIR`` set."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def mark_worker_dead(pid: int) -> None:
    """Drop the live gauges of an exited worker (call from the supervisor)."""
    prom_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def merged_registry() -> CollectorRegistry:
    """A registry whose exposition merges every worker's values, read from the mmap files.

    Raises:
        ConfigError: the environment was not prepared before ``prometheus_client`` was imported.
    """
    path = os.environ.get(MULTIPROC_DIR_ENV, "")
    if not multiprocess_enabled() or not os.path.isdir(path):
        raise ConfigError(
            f"set {MULTIPROC_DIR_ENV} to an empty directory before starting the workers",
            key="workers",
        )
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry
