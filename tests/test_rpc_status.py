"""call_status on a real grpc.aio server on loopback: each call's status counted once,
before the client sees it, and a failure sent as its status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from services.core.rpc_status import call_status
from services.core.validation import RpcFailure

SERVICE = "test.Probe"


class Probe:
    """Unary `Say` and streaming `Count`, whose request names how each ends."""

    def __init__(self) -> None:
        self.counted: list[grpc.StatusCode] = []
        self.stream_started = asyncio.Event()

    def count(self, code: grpc.StatusCode) -> None:
        self.counted.append(code)

    async def say(self, request: bytes, context: Any) -> bytes:
        async with call_status(context, self.count):
            if request == b"invalid":
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "inputs.country: empty")
            if request == b"upstream":
                await self._upstream_failure()
            return b"ok:" + request

    async def count_up(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        async with call_status(context, self.count):
            for n in range(3):
                yield str(n).encode()
            if request == b"fail":
                raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            if request == b"forever":
                self.stream_started.set()
                await asyncio.sleep(60)

    async def _upstream_failure(self) -> None:
        # A call this one makes to a server that is not there: grpc's own AioRpcError.
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Say")
            await call(b"x", timeout=2)


def identity(data: bytes) -> bytes:
    return data


async def serve(probe: Probe) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(
            probe.say, request_deserializer=identity, response_serializer=identity
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            probe.count_up, request_deserializer=identity, response_serializer=identity
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def run(scenario: Callable[[Probe, grpc.aio.Channel], Any]) -> Probe:
    async def main() -> Probe:
        probe = Probe()
        server, port = await serve(probe)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(probe, channel)
        finally:
            await server.stop(None)
        return probe

    return asyncio.run(main())


def test_unary_calls_are_counted_once_with_their_status() -> None:
    async def scenario(probe: Probe, channel: grpc.aio.Channel) -> None:
        say = channel.unary_unary(f"/{SERVICE}/Say")
        assert await say(b"Peru") == b"ok:Peru"
        assert probe.counted == [grpc.StatusCode.OK]
        try:
            await say(b"invalid")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == "inputs.country: empty"
            # Counted before the client saw the status.
            assert probe.counted[-1] == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("an RpcFailure must end the call with its status")
        try:
            await say(b"upstream")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # the upstream call's own code
            assert probe.counted[-1] == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("an upstream failure must pass on its status")

    probe = run(scenario)
    assert probe.counted == [
        grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE,
    ]  # fmt: skip


def test_streamed_calls_count_ok_failure_and_cancellation() -> None:
    async def scenario(probe: Probe, channel: grpc.aio.Channel) -> None:
        count = channel.unary_stream(f"/{SERVICE}/Count")
        assert [chunk async for chunk in count(b"")] == [b"0", b"1", b"2"]
        received = []
        try:
            async for chunk in count(b"fail"):
                received.append(chunk)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert probe.counted[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert received == [b"0", b"1", b"2"]  # what was sent before the failure arrives
        call = count(b"forever")
        await probe.stream_started.wait()
        call.cancel()
        for _ in range(200):  # the server sees the cancellation shortly after
            if len(probe.counted) == 3:
                break
            await asyncio.sleep(0.01)

    probe = run(scenario)
    assert probe.counted == [
        grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
    ]  # fmt: skip
