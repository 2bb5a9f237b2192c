"""Locating the e2e tools, running upstream servers on loopback, clean client environments.

``.ci/e2e-setup`` installs everything under ``build/e2e`` (and Debian's go toolchain); a test
whose tool is missing is skipped with the reason, never silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from proxychain.settings import Settings
from tests.conftest import RunningProxy, run_proxy

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = REPO / "build" / "e2e"
WHEELS_DIR = E2E_DIR / "wheels"
PYPISERVER = E2E_DIR / "pypiserver" / "bin" / "pypi-server"
VERDACCIO = E2E_DIR / "verdaccio" / "node_modules" / ".bin" / "verdaccio"
SETUP_HINT = "run .ci/e2e-setup"
# A server that has not opened its port by then is broken, not slow (verdaccio takes ~2 s).
READY_TIMEOUT_SECONDS = 30.0
READY_POLL_SECONDS = 0.05
STOP_TIMEOUT_SECONDS = 5.0
# Environment variables a client may inherit; everything else (PIP_*, npm_config_*, GO*...)
# would leak this machine's configuration into the test.
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")


def require(path_or_command: Path | str) -> str:
    """The tool's path, or skip the test naming what is missing."""
    if isinstance(path_or_command, Path):
        if path_or_command.exists():
            return str(path_or_command)
        pytest.skip(f"{path_or_command.relative_to(REPO)} is missing ({SETUP_HINT})")
    found = shutil.which(path_or_command)
    if found is None:
        pytest.skip(f"{path_or_command} is not installed ({SETUP_HINT})")
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: PATH and locale only, ``HOME`` in the test's directory."""
    env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    env["HOME"] = str(home)
    env.update(extra)
    return env


class Server:
    """An upstream server in a subprocess on 127.0.0.1:``port``."""

    def __init__(
        self, argv: Sequence[str], *, port: int, log: Path, env: Mapping[str, str], cwd: Path
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._env = dict(env)
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> Server:
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self._env, cwd=self._cwd
            )
        with trio.move_on_after(READY_TIMEOUT_SECONDS):
            while self._proc.poll() is None:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(READY_POLL_SECONDS)
                    continue
                await stream.aclose()
                return self
        tail = self.log.read_text(errors="replace")[-2000:]
        await self.stop()
        raise RuntimeError(f"{self.argv[0]} did not start on port {self.port}:\n{tail}")

    async def stop(self) -> None:
        """Terminate the server and wait for it (killed if it lingers)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await trio.to_thread.run_sync(proc.wait, STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)


async def run(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion; on failure the assertion shows its output."""
    result = await trio.run_process(
        list(argv), env=dict(env), cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout.decode(errors='replace')[-3000:]}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')[-3000:]}"
        )
    return result


def static_server(root: Path, *, log: Path, home: Path) -> Server:
    """A plain static file server over ``root`` (404 for anything missing)."""
    import sys

    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return Server(argv, port=port, log=log, env=clean_env(home), cwd=root)


def pypiserver(packages: Path, *, log: Path, home: Path) -> Server:
    """pypiserver over ``packages``, never redirecting to the public index."""
    exe = require(PYPISERVER)
    port = free_port()
    argv = [exe, "run", "-i", "127.0.0.1", "-p", str(port), "--disable-fallback"]
    argv += ["-a", ".", "-P", ".", str(packages)]
    return Server(argv, port=port, log=log, env=clean_env(home), cwd=packages)


@asynccontextmanager
async def running_proxy(settings: Settings) -> AsyncIterator[RunningProxy]:
    """``run_proxy``, but a failure inside still shuts the proxy down gracefully first.

    Leaving ``run_proxy`` by an exception cancels the server while a client's keep-alive
    connection is open, and that accepted socket is then never closed (a ResourceWarning that
    fails the run); keep the failure until the proxy has drained.
    """
    failure: BaseException | None = None
    async with run_proxy(settings) as proxy:
        try:
            yield proxy
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise failure


def verdaccio(storage: Path, *, log: Path, home: Path, url_prefix: str = "") -> Server:
    """verdaccio with no uplinks (nothing reaches the public registry), open registration
    and anonymous reads; ``url_prefix`` is where it says its tarballs live."""
    exe = require(VERDACCIO)
    port = free_port()
    config = storage.parent / "verdaccio.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    lines = [
        f"storage: {storage}",
        "auth:",
        "  htpasswd:",
        f"    file: {storage.parent / 'htpasswd'}",
        "    max_users: 100",
        "uplinks: {}",
        "packages:",
        "  '**':",
        "    access: $all",
        "    publish: $authenticated",
        "log: {type: stdout, format: pretty, level: warn}",
    ]
    if url_prefix:
        lines.append(f"url_prefix: {url_prefix}")
    config.write_text("\n".join(lines) + "\n")
    argv = [exe, "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    return Server(argv, port=port, log=log, env=clean_env(home), cwd=storage.parent)


async def npm_token(registry: str, user: str = "e2e", password: str = "e2e-password") -> str:
    """Register ``user`` on a verdaccio (npm adduser's API) and return its token."""
    import json
    import urllib.request

    body = json.dumps({"name": user, "password": password}).encode()
    request = urllib.request.Request(
        f"{registry}/-/user/org.couchdb.user:{user}",
        data=body,
        method="PUT",
        headers={"content-type": "application/json"},
    )

    def put() -> str:
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["token"])

    return await trio.to_thread.run_sync(put)
