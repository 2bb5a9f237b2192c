"""A proxy.py reverse-proxy plugin that forwards every path to one upstream given at start.

proxy.py's own ``proxy.plugin.ReverseProxyPlugin`` has its routes written in the code (an
example pointing at httpbingo.org), and a static route rewrites every request to the route's
own path, so neither can front the bench origin from the command line. This plugin routes
``/.*`` to ``$PROXYCHAIN_BENCH_UPSTREAM`` (``http://127.0.0.1:PORT``), keeping the request's
path and query. :func:`targets.proxypy` starts it as::

    PROXYCHAIN_BENCH_UPSTREAM=http://127.0.0.1:PORT PYTHONPATH=bench \
    python -m proxy --enable-reverse-proxy --plugins proxypy_upstream.UpstreamReverseProxy ...

proxy.py imports plugins by dotted name in each worker, hence the environment variable rather
than a flag.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from proxy.http import Url
from proxy.http.parser import HttpParser
from proxy.http.server import ReverseProxyBasePlugin

__all__ = ["ENV_UPSTREAM", "UpstreamReverseProxy"]

ENV_UPSTREAM = "PROXYCHAIN_BENCH_UPSTREAM"


class UpstreamReverseProxy(ReverseProxyBasePlugin):
    """Every request path, unchanged, to the one upstream named in the environment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        upstream = urlsplit(os.environ[ENV_UPSTREAM])
        self._hostname = (upstream.hostname or "127.0.0.1").encode()
        self._port = upstream.port or 80

    def routes(self) -> list[str | tuple[str, list[bytes]]]:
        """One dynamic route that matches every path."""
        return [r"/.*"]

    def handle_route(self, request: HttpParser, pattern: re.Pattern[str]) -> Url:
        """The upstream URL for ``request``: same path and query on the upstream host."""
        return Url(
            scheme=b"http",
            hostname=self._hostname,
            port=self._port,
            remainder=request.path or b"/",
        )
