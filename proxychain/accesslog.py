"""The access log: one line per request (and per refused request head), with its fields.

The line is for people; the same figures go in ``extra`` for the JSON formatter
(:mod:`proxychain.logs`). Nothing is formatted while the ``proxychain.access`` logger is off
(``log.access_log = false`` disables it).
"""

from __future__ import annotations

import logging

__all__ = ["access_log", "log_access_line"]

access_log = logging.getLogger("proxychain.access")


def log_access_line(
    addr: str,
    method: str,
    target: str,
    status: int,
    nbytes: int,
    duration: float,
    outcome: str,
    tier: str,
    upstream: str,
    route: str,
    detail: str,
) -> None:
    """Log one request's line: who asked, what for, and how it was answered."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    access_log.info(
        '%s "%s %s" %d %d %.3fs cache=%s tier=%s upstream=%s%s',
        addr or "-",
        method,
        target,
        status,
        nbytes,
        duration,
        outcome,
        tier,
        upstream,
        f" ({detail})" if detail else "",
        extra={
            "client": addr,
            "method": method,
            "path": target,
            "status": status,
            "bytes": nbytes,
            "duration": round(duration, 6),
            "cache": outcome,
            "tier": tier,
            "upstream": upstream,
            "route": route,
            "detail": detail,
        },
    )
