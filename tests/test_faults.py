"""Faults the edge host will see: a runtime killed mid-stream, then coming back."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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


def runtime_on(port: int, bundle: Path, metrics_port: int = 0, threads: int = 2) -> ServerProcess:
    return start_runtime("--bundle", str(bundle), "--n-ctx", "1024", "--port", str(port),
                         "--metrics-port", str(metrics_port),
                         "--n-threads", str(threads))  # fmt: skip


def test_router_with_a_fallback_sees_a_runtime_that_just_came_up(bundle: Path) -> None:
    """A fallback makes the router SERVING before its runtime is up (install.sh then waits on
    the router's own LocalRuntime entry); with the API down, a call before the runtime is up
    says why it failed, and once it is up calls are answered locally within gRPC's reconnect
    backoff (at most a second)."""
    from services.router.server import LOCAL_HEALTH_SERVICE

    port = free_port()
    router = start_router(bundle, f"127.0.0.1:{port}", "--mode", "hybrid", "--threshold", "0.0",
                          "--fallback-model", "openai/gold",
                          "--fallback-api-base", f"http://127.0.0.1:{free_port()}/v1")  # fmt: skip
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
            router.wait_serving(2, service=LOCAL_HEALTH_SERVICE)
            assert client.predict({"country": "Italy"}).served_by == pb.SERVED_BY_LOCAL
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


def predict_calls(metrics_port: int) -> int:
    """Predict calls a runtime answered, from its Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edgedistill_calls_total" and sample.labels["method"] == "Predict"
    )


def test_grpc_round_robin_spreads_calls_and_rides_out_a_killed_runtime(bundle: Path) -> None:
    """An `ipv4:` target over three runtimes: gRPC's round_robin gives each a third of the
    calls; one SIGKILLed costs no call after the first second; back on its port, it is used
    again."""
    ports = [(free_port(), free_port()) for _ in range(3)]
    # One thread each: three runtimes on this machine's two cores, not six spinning threads.
    runtimes = [runtime_on(port, bundle, metrics, threads=1) for port, metrics in ports]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port, _ in ports)
    router = start_router(bundle, target, "--mode", "local_only")
    client = InferenceClient(router.target, timeout_s=60)
    try:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: client.predict({"country": "Peru"}), range(45)))
        assert all(r.served_by == pb.SERVED_BY_LOCAL for r in replies)
        shares = [predict_calls(metrics) / 45 for _, metrics in ports]
        assert all(abs(share - 1 / 3) <= 0.15 / 3 for share in shares), shares

        runtimes[0].proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        failures = []
        while time.monotonic() - killed_at < 4:
            try:
                client.predict({"country": "Chile"})
            except grpc.RpcError as err:
                failures.append((time.monotonic() - killed_at, err.code()))
        assert all(after < 1.0 for after, _ in failures), failures

        port, metrics = ports[0]
        runtimes[0] = runtime_on(port, bundle, metrics, threads=1)
        deadline = time.monotonic() + 10
        while predict_calls(metrics) == 0:
            assert time.monotonic() < deadline, "the router never went back to the runtime"
            client.predict({"country": "Chile"})
    finally:
        client.close()
        router.terminate()
        for runtime in runtimes:
            runtime.terminate()
