"""Config scalars: sizes, durations and listen addresses, from TOML values to plain numbers.

A config file may write a size as ``1048576`` or ``"256MiB"`` and a duration as ``30`` or
``"1h30m"``; the settings hold only bytes and seconds. These parsers are the one place that
spelling is understood. They raise ``ValueError`` with what was expected, and the config-file
reader (:mod:`proxychain.configfile`) adds the file, the key and the offending value.
"""

from __future__ import annotations

import re

__all__ = [
    "DAYS",
    "HOURS",
    "MINUTES",
    "SECONDS",
    "GiB",
    "KiB",
    "MiB",
    "parse_duration",
    "parse_listen",
    "parse_size",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB|K|M|G|T)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 1000,
    "m": MiB,
    "mib": MiB,
    "mb": 1000**2,
    "g": GiB,
    "gib": GiB,
    "gb": 1000**3,
    "t": 1024 * GiB,
    "tib": 1024 * GiB,
    "tb": 1000**4,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like ``"256MiB"``; raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a non-negative size")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    raise ValueError('expected a size such as 1048576, "512KiB", "256MiB" or "20GiB"')


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"1s"``, ``"500ms"``, ``"1h30m"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a non-negative duration")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos = 0
        total = 0.0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
            pos = match.end()
        else:
            if pos == len(text) and pos > 0:
                return total
    raise ValueError('expected a duration such as 30, "500ms", "10s", "5m", "1h" or "7d"')


def parse_listen(value: object) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) to a pair; raises ``ValueError``."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8080"')
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8080"')
    return host, int(port_text)
