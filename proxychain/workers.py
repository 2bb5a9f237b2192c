"""``proxychain serve --workers N``: N processes sharing one listening socket and one disk tier.

Theory of operation:

* The supervisor (the parent) binds the data-plane socket once, prepares prometheus-client's
  multi-process directory, and forks N workers. It never runs trio: it waits for signals and
  child exits with ``sigtimedwait``, with those signals blocked so none is lost between checks.
* Each worker inherits the socket, runs its own proxy (its own memory tier; the disk tier is
  shared and safe for several writers) and answers with ``x-proxychain-worker: <pid>``.
  The workers publish their open-connection counts on a board in shared memory made before
  the fork, and one ahead of a sibling leaves new connections to it
  (:mod:`proxychain.balance`); the supervisor clears a dead worker's count.
  Worker 0 also serves the admin plane; ``/metrics`` there merges every worker's figures, and
  ``/admin/stats`` merges the stats documents the workers share once a second
  (:mod:`proxychain.workerstats`).
* Workers live in their own process group so a terminal's Ctrl-C reaches only the supervisor,
  which forwards SIGTERM once: one graceful drain, not the "second signal: stop now" path.
  A worker whose supervisor vanished shuts itself down.
* SIGINT/SIGTERM to the supervisor: forward, wait ``graceful_timeout`` plus a margin, then
  SIGKILL what is left. A worker that dies otherwise is logged and restarted, at most
  ``MAX_RESTARTS`` times per ``RESTART_WINDOW_S``; beyond that the supervisor stops everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from .balance import ConnectionBoard, Seat
from .purgelog import clear_purge_log
from .settings import ServerSettings, Settings
from .workerstats import forget_worker

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW_S", "run_workers"]

log = logging.getLogger("proxychain.workers")

MAX_RESTARTS = 5  # worker restarts allowed per window before the supervisor gives up
RESTART_WINDOW_S = 60.0
SHUTDOWN_MARGIN_S = 2.0  # on top of graceful_timeout before survivors are killed
MAX_SHUTDOWN_WAIT_S = 300.0  # bound when graceful_timeout is infinite
SUPERVISOR_TICK_S = 1.0  # how often the supervisor wakes without a signal
PARENT_POLL_S = 0.5  # how often a worker checks that its supervisor still exists
LISTEN_BACKLOG = 1024
EXIT_GAVE_UP = 1
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client at import time
_WATCHED = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM)


def run_workers(settings: Settings) -> int:
    """Supervise ``settings.server.workers`` worker processes; the exit status of the CLI."""
    tmp_metrics_dir = _prepare_multiproc_dir()
    sock = _bind(settings.server)
    clear_purge_log(settings.cache.dir)  # no worker follows it yet
    port = sock.getsockname()[1]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    supervisor = _Supervisor(settings, sock, old_mask)
    try:
        log.info(
            "supervising %d workers on %s:%d", settings.server.workers, settings.server.host, port
        )
        return supervisor.run()
    finally:
        sock.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if tmp_metrics_dir is not None:
            shutil.rmtree(tmp_metrics_dir, ignore_errors=True)


def _prepare_multiproc_dir() -> str | None:
    """Point prometheus-client at an empty directory; returns it when we created it."""
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):  # stale files from an earlier run would be summed in
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
        return None
    path = tempfile.mkdtemp(prefix="proxychain-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = path
    return path


def _bind(server: ServerSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((server.host, server.port))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


class _Supervisor:
    def __init__(self, settings: Settings, sock: socket.socket, child_mask: set[int]) -> None:
        self.settings = settings
        self.sock = sock
        self.child_mask = child_mask
        self.workers: dict[int, int] = {}  # pid -> worker index
        self.board = ConnectionBoard(settings.server.workers)
        self.restarts: list[float] = []  # monotonic times of recent restarts

    def run(self) -> int:
        for index in range(self.settings.server.workers):
            self._spawn(index)
        status = 0
        while True:
            info = signal.sigtimedwait(_WATCHED, SUPERVISOR_TICK_S)
            if info is not None and info.si_signo != signal.SIGCHLD:
                log.info("received %s: stopping workers", signal.Signals(info.si_signo).name)
                break
            if not self._reap_and_restart():
                log.error(
                    "workers keep dying (%d restarts in %.0f s)", MAX_RESTARTS, RESTART_WINDOW_S
                )
                status = EXIT_GAVE_UP
                break
        self._stop_all()
        log.info("stopped")
        return status

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                seat = self.board.seat(index)
                code = _worker_main(self.settings, self.sock, seat, self.child_mask)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def _reap_and_restart(self) -> bool:
        """Collect exited workers and start replacements; False once restarts are exhausted."""
        for pid, index, status in self._reap():
            log.error("worker %d (pid %d) died: %s", index, pid, _describe(status))
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
            if len(self.restarts) >= MAX_RESTARTS:
                return False
            self.restarts.append(now)
            self._spawn(index)
        return True

    def _reap(self) -> list[tuple[int, int, int]]:
        exited = []
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            index = self.workers.pop(pid, None)
            if index is not None:
                _forget_metrics(pid)
                self.board.seat(index).report(0)  # its connections died with it
                exited.append((pid, index, status))
        return exited

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        grace = self.settings.server.graceful_timeout
        wait = grace + SHUTDOWN_MARGIN_S if math.isfinite(grace) else MAX_SHUTDOWN_WAIT_S
        deadline = time.monotonic() + min(wait, MAX_SHUTDOWN_WAIT_S)
        while self.workers:
            self._reap()
            left = deadline - time.monotonic()
            if not self.workers or left <= 0:
                break
            info = signal.sigtimedwait(_WATCHED, min(left, SUPERVISOR_TICK_S))
            if info is not None and info.si_signo != signal.SIGCHLD:
                # A second signal means "now", as in single-process mode.
                self._signal_all(signal.SIGTERM)
        if self.workers:
            log.warning("killing %d workers still running after %.1f s", len(self.workers), wait)
            self._signal_all(signal.SIGKILL)
            for pid in list(self.workers):
                os.waitpid(pid, 0)
                _forget_metrics(pid)
            self.workers.clear()

    def _signal_all(self, signum: signal.Signals) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                os.kill(pid, signum)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _forget_metrics(pid: int) -> None:
    from .metrics import mark_worker_dead

    mark_worker_dead(pid)
    forget_worker(Path(os.environ[MULTIPROC_DIR_ENV]), pid)


# -- inside a worker ----------------------------------------------------------------------------


def _worker_main(settings: Settings, sock: socket.socket, seat: Seat, mask: set[int]) -> int:
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if seat.index != 0:
        settings = settings.replace(admin=dataclasses.replace(settings.admin, enabled=False))
    trio.run(_worker, settings, sock, seat, os.getppid())
    return 0


async def _worker(settings: Settings, sock: socket.socket, seat: Seat, parent: int) -> None:
    from .__main__ import run

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await run(
        settings,
        listeners=[listener],
        worker_id=str(os.getpid()),
        seat=seat,
        share_dir=Path(os.environ[MULTIPROC_DIR_ENV]),
        watch=partial(_watch_parent, parent),
        label=f"worker {seat.index} (pid {os.getpid()})",
    )


async def _watch_parent(parent: int, shutdown: trio.Event) -> None:
    """Drain when the supervisor is gone (killed outright): nobody else would stop us."""
    while True:
        await trio.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            break
    log.warning("supervisor (pid %d) is gone: shutting down", parent)
    shutdown.set()
