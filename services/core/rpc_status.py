"""How a servicer's call ends: its status counted once, a failure sent as that status."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from services.core.validation import RpcFailure


@contextlib.asynccontextmanager
async def call_status(
    context: Any, count: Callable[[grpc.StatusCode], None]
) -> AsyncIterator[None]:
    """Around one RPC's work, unary or streaming: `count` gets the call's status exactly once
    (OK, CANCELLED when the client went away, or the failure's code), and an RpcFailure, or
    the failure of a call made upstream, ends the call with its status and message.

    A failure is counted before the status reaches the client, so a scrape right after the
    client sees it includes it."""
    code: grpc.StatusCode | None = grpc.StatusCode.OK  # None once counted
    try:
        yield
    except RpcFailure as failure:
        count(failure.code)
        code = None
        await context.abort(failure.code, failure.message)
    except grpc.aio.AioRpcError as err:
        count(err.code())
        code = None
        await context.abort(err.code(), err.details() or "")
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        if code is not None:
            count(code)
