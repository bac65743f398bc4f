"""``aha serve`` as a subprocess on a free loopback port: for the load benchmark and the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``aha serve MODEL FLAGS...`` on a free 127.0.0.1 port, its output in ``log``; up once constructed.

    Raises:
        RuntimeError: the server exited, or did not answer ``/health`` within ``startup_seconds``
            (the message ends with the log's tail).
    """

    def __init__(self, model: str, *flags: str, log: Path, startup_seconds: float = 240.0):
        self.model, self.port, self.log = model, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "aha.cli", "serve", model, "--port", str(self.port), *flags]
        with log.open("w") as output:
            self.process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"aha serve exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"aha serve did not answer /health in {startup_seconds:.0f} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{sample: value}``; labelled samples keep their labels (``name{label="x"}``)."""
        samples = {}
        for line in httpx2.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def stop(self) -> None:
        """SIGTERM (the server drains its requests), then SIGKILL after a minute."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_server(model: str, *flags: str, log: Path) -> Iterator[ServerProcess]:
    """A :class:`ServerProcess` for the block, stopped on exit."""
    server = ServerProcess(model, *flags, log=log)
    try:
        yield server
    finally:
        server.stop()
