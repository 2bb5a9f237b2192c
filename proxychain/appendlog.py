"""Append-only line files shared between processes (the digest book, the purge log).

Writers append whole lines with ``O_APPEND``, so lines from several processes never
interleave; readers keep an offset and read only complete lines past it. A file that shrank
below a reader's offset was compacted by another process and is read again from the start.
These are blocking calls: run them in a worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["append_lines", "read_new_lines"]


def append_lines(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path``, creating it if needed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_new_lines(path: Path, offset: int) -> tuple[bytes, int]:
    """Whole lines from ``offset`` on, and the offset after the last complete line."""
    try:
        with path.open("rb") as file:
            if os.fstat(file.fileno()).st_size < offset:
                offset = 0  # compacted by another process: read it again
            file.seek(offset)
            data = file.read()
    except FileNotFoundError:
        return b"", 0
    end = data.rfind(b"\n") + 1
    return data[:end], offset + end
