"""proxychain: a streaming, two-tier caching reverse proxy with a failover chain of upstreams."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
