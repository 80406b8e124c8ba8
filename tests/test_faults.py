"""Faults the edge host will see: a runtime killed mid-stream, then coming back."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.core.api import pb
from services.core.client import InferenceClient
from testkit.bundles import CAPITALS_PROGRAM
from testkit.openai_standin import OpenAIStandIn
from testkit.processes import ServerProcess, free_port, start_router, start_runtime


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    from testkit.bundles import make_bundle

    return make_bundle(tmp_path_factory.mktemp("faults") / "bundle", gguf_path, CAPITALS_PROGRAM)


def runtime_on(port: int, bundle: Path) -> ServerProcess:
    return start_runtime("--bundle", str(bundle), "--n-ctx", "1024", "--port", str(port))


def test_router_with_a_fallback_sees_a_runtime_that_just_came_up(bundle: Path) -> None:
    """A fallback makes the router SERVING before its runtime is up (install.sh then waits on
    the router's own LocalRuntime entry); with the API down, a call before the runtime is up
    says why it failed, and a call right after it comes up is answered locally even though
    the router's next health round is a minute away."""
    from services.router.server import LOCAL_HEALTH_SERVICE

    port = free_port()
    router = start_router(bundle, f"127.0.0.1:{port}", "--mode", "hybrid", "--threshold", "0.0",
                          "--fallback-model", "openai/gold",
                          "--fallback-api-base", f"http://127.0.0.1:{free_port()}/v1",
                          "--health-interval-s", "60")  # fmt: skip
    runtime = None
    try:
        router.wait_serving(5, status=health_pb2.HealthCheckResponse.NOT_SERVING,
                            service=LOCAL_HEALTH_SERVICE)  # fmt: skip
        with InferenceClient(router.target, timeout_s=60) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.predict({"country": "Italy"})
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "API fallback failed" in (caught.value.details() or "")
            runtime = runtime_on(port, bundle)
            assert client.predict({"country": "Italy"}).served_by == pb.SERVED_BY_LOCAL
        router.wait_serving(5, service=LOCAL_HEALTH_SERVICE)
    finally:
        router.terminate()
        if runtime is not None:
            runtime.terminate()


def test_runtime_killed_mid_stream_then_back(bundle: Path) -> None:
    port = free_port()
    runtime = runtime_on(port, bundle)
    with OpenAIStandIn({"Japan": "Tokyo"}, input_field="country", output_field="capital") as api:
        router = start_router(
            bundle, f"127.0.0.1:{port}", "--threshold", "0.0",
            "--fallback-model", "openai/gold", "--fallback-api-base", api.base_url,
        )  # fmt: skip
        client = InferenceClient(router.target, timeout_s=60)
        try:
            # A stream through the router is cut by SIGKILL: the caller hears at once.
            story = client.generate([("user", "Write a long story about a whale.")],
                                    max_tokens=400, temperature=0)  # fmt: skip
            first = threading.Event()
            outcome: list[object] = []

            def read() -> None:
                try:
                    for _ in story:
                        first.set()
                    outcome.append("finished")
                except grpc.RpcError as err:
                    outcome.append((err.code(), time.monotonic()))

            reader = threading.Thread(target=read)
            reader.start()
            assert first.wait(30)
            runtime.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            reader.join(10)
            code, heard_at = outcome[0]  # type: ignore[misc]
            assert code == grpc.StatusCode.UNAVAILABLE
            assert heard_at - killed_at < 1.0

            # Predict falls back to the API within a second while the runtime is gone.
            started = time.monotonic()
            reply = client.predict({"country": "Japan"})
            assert time.monotonic() - started < 1.0
            assert reply.served_by == pb.SERVED_BY_FALLBACK
            assert reply.route_reason == "local_unavailable"

            # The runtime comes back on its port: the router serves locally again.
            runtime = runtime_on(port, bundle)
            deadline = time.monotonic() + 10
            while True:
                reply = client.predict({"country": "Japan"})
                if reply.served_by == pb.SERVED_BY_LOCAL:
                    break
                assert time.monotonic() < deadline, "the router never went back to the runtime"
                time.sleep(0.2)
        finally:
            client.close()
            router.terminate()
            runtime.terminate()


def test_router_health_follows_its_runtime(bundle: Path) -> None:
    """Started before its runtime (compose starts both at once), the router says NOT_SERVING
    until the runtime is up, then SERVING and answering; when the runtime dies, calls fail
    fast with UNAVAILABLE and health goes back to NOT_SERVING."""
    port = free_port()
    router = start_router(bundle, f"127.0.0.1:{port}", "--mode", "local_only",
                          status=health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
    runtime = None
    try:
        time.sleep(3)  # the router has tried and failed to reach it a few times by now
        runtime = runtime_on(port, bundle)
        started = time.monotonic()
        router.wait_serving(30)
        assert time.monotonic() - started < 5.0, "the router was slow to see its runtime"
        with InferenceClient(router.target, timeout_s=60) as client:
            assert client.predict({"country": "Italy"}).served_by == pb.SERVED_BY_LOCAL
            runtime.proc.send_signal(signal.SIGKILL)
            runtime.proc.wait(10)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                client.predict({"country": "Italy"})
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 1.0
        router.wait_serving(10, status=health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        router.terminate()
        if runtime is not None:
            runtime.terminate()
