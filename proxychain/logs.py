"""Logging setup: text or JSON lines, one access-log line per request.

The access log uses the ``proxychain.access`` logger with the request's fields passed as
``extra``; the JSON formatter emits them as keys, the text formatter prints the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .settings import LogSettings

__all__ = ["JsonFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(
            (name, value)
            for name, value in vars(record).items()
            if name not in _STANDARD_ATTRS and not name.startswith("_")
        )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(settings: LogSettings) -> None:
    """Send proxychain's logs to stderr in the configured format and level."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("proxychain")
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    root.propagate = False
    logging.getLogger("proxychain.access").disabled = not settings.access_log
