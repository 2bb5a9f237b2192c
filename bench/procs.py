"""Child processes of the driver: start, wait until ready, measure, stop by PID.

Every server the bench runs is a :class:`Managed` process started in its own session (so a
Ctrl-C at the terminal reaches only the driver, which then cleans up) with its output in a log
file. Readiness is a TCP connect to its loopback port within a bound. Stopping sends SIGTERM to
the PID, waits a bounded time, then SIGKILLs the PID and any descendants still alive (nginx and
varnish workers are children of a master), each by its own PID. :data:`REGISTRY` lets the
driver stop everything in one ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import trio

__all__ = [
    "REGISTRY",
    "Managed",
    "StartError",
    "descendants",
    "free_port",
    "peak_rss_kib",
    "reset_peak_rss",
    "stop_all",
]

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class StartError(RuntimeError):
    """A child did not come up (exited, or its port never opened)."""


def free_port() -> int:
    """A loopback port free right now (bound to 0 and released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _status_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_kib(pid: int) -> tuple[int, int]:
    """(largest VmHWM of one process, sum of VmHWM) over ``pid`` and its descendants, KiB."""
    values = [_status_kib(p, "VmHWM") for p in [pid, *descendants(pid)]]
    return max(values, default=0), sum(values)


def rss_kib(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and its descendants, KiB (the baseline for a peak)."""
    return sum(_status_kib(p, "VmRSS") for p in [pid, *descendants(pid)])


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM of ``pid`` and its descendants (``clear_refs`` 5, Linux >= 4.0)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            Path(f"/proc/{p}/clear_refs").write_text("5")


class Managed:
    """One server process the driver owns."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log = log
        self.env = env  # None: inherit the driver's environment
        self.cwd = cwd
        self.admin_port: int | None = None  # proxychain's admin listener, when it has one
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        """PID of the running process."""
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        """Start the process (not waiting for readiness)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                cwd=self.cwd,
            )
        self.started_at = time.perf_counter()
        REGISTRY.append(self)

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the port accepts connections; raise :class:`StartError` otherwise."""
        with trio.move_on_after(timeout):
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise StartError(f"{self.name} exited early; log tail:\n{self.log_tail()}")
                try:
                    stream = await trio.open_tcp_stream(HOST, self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                return
        raise StartError(f"{self.name} not listening after {timeout}s; log:\n{self.log_tail()}")

    async def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Spawn and wait until ready."""
        self.spawn()
        try:
            await self.wait_ready(timeout)
        except StartError:
            self.stop()
            raise

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the process's output."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop by PID: ``sig``, bounded wait, then SIGKILL it and any leftover descendants."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self in REGISTRY:
            REGISTRY.remove(self)
        kids = descendants(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for kid in kids:
            while _alive(kid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(kid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


REGISTRY: list[Managed] = []


def stop_all() -> None:
    """Stop every process still registered, newest first."""
    for managed in reversed(list(REGISTRY)):
        managed.stop()
