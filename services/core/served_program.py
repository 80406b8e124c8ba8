"""The program a runtime or router serves, as a DSPy module.

Swap it in where the original program was called: `ServedProgram("edge:50052")(ticket=...)`
returns a `dspy.Prediction` of the served outputs, so application code, `dspy.Evaluate` and the
author's metric run against the local model (or the router's hybrid) unchanged. Each call is
one Predict: the program's own prompt format and typed decoding, as the bundle was built for
(pointing `dspy.LM` at the chat API instead prompts the model in DSPy's layout, not the one it
was trained on).

Values arrive typed as JSON (a bool is a bool, a model an object). Given the author's signature
or program, each output is validated into its annotation as DSPy's parser types it (an Enum
member, a pydantic model).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator
from typing import Any

import dspy
import grpc
import pydantic
from dspy.streaming import StatusMessage, StreamResponse

from services.core.api import pb
from services.core.client import InferenceClient
from services.core.predict_stream import restart_note
from services.core.program import output_annotations, typed_value


class UnparsedAnswer(RuntimeError):
    """The served model's answer did not parse into the program's outputs (as DSPy's own
    AdapterParseError: `dspy.Evaluate` scores the row as failed)."""


class ServedProgram(dspy.Module):
    """`target` is a runtime's or router's gRPC address; `types` the author's signature or
    program (its predictors' output fields), to type the outputs as they declare them; the
    rest as `InferenceClient` takes it."""

    def __init__(
        self,
        target: str,
        *,
        types: type[dspy.Signature] | dspy.Module | None = None,
        timeout_s: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self._annotations = typed_outputs(types)
        self._connect = functools.partial(
            InferenceClient, target, timeout_s=timeout_s, credentials=credentials, token=token
        )
        self._client = self._connect()

    def forward(self, **inputs: Any) -> dspy.Prediction:
        with _bad_input_as_value_error():
            reply = self._client.predict(inputs)  # typed values go as inputs_json
        return self._prediction(reply)

    def stream(self, **inputs: Any) -> Iterator[StreamResponse | StatusMessage | dspy.Prediction]:
        """The call with its output values as the model writes them, in the items
        `dspy.streamify(..., async_streaming=False)` yields: a `StreamResponse` per piece
        (`is_last_chunk` on a field's last), then the `dspy.Prediction` (one PredictStream).
        A router's restart (the API model answers instead) is a `StatusMessage` saying so;
        the pieces after it are the new answer's."""
        with _bad_input_as_value_error():
            chunks = self._client.predict_stream(inputs)
            held: pb.OutputDelta | None = None  # a piece waits to learn whether it is the last
            for chunk in chunks:
                if chunk.HasField("response") or chunk.HasField("restart"):
                    if held is not None:
                        yield _piece(held, last=True)
                    held = None
                if chunk.HasField("response"):
                    yield self._prediction(chunk.response)
                    return
                if chunk.HasField("restart"):
                    yield StatusMessage(restart_note(chunk.restart))
                    continue
                if held is not None:
                    same = (held.predictor, held.field) == (chunk.delta.predictor,
                                                            chunk.delta.field)  # fmt: skip
                    yield _piece(held, last=not same)
                held = chunk.delta

    def _prediction(self, reply: pb.PredictResponse) -> dspy.Prediction:
        if reply.outcome != pb.PREDICT_OUTCOME_PARSED:
            outcome = pb.PredictOutcome.Name(reply.outcome).removeprefix("PREDICT_OUTCOME_")
            raise UnparsedAnswer(
                f"{self.target}: the answer was {outcome.lower()}, not the program's outputs: "
                f"{reply.raw_text!r}"
            )
        values = json.loads(reply.outputs_json)
        return dspy.Prediction(**{k: self._typed(k, v) for k, v in values.items()})

    def _typed(self, name: str, value: Any) -> Any:
        annotation = self._annotations.get(name)
        if annotation is None:
            return value
        try:
            return typed_value(value, annotation)
        except pydantic.ValidationError as err:
            raise ValueError(
                f"{name}: the served value {value!r} is not of the given type {annotation!r}: "
                f"{err.errors()[0]['msg']}; is `types` this bundle's program?"
            ) from None

    def __deepcopy__(self, memo: dict[int, Any]) -> ServedProgram:
        # a gRPC channel is not copied: the copy opens its own (optimizers copy programs)
        found = copy.copy(self)
        found._client = self._connect()
        return found


@contextlib.contextmanager
def _bad_input_as_value_error() -> Iterator[None]:
    """A request the server refuses by field is the caller's ValueError, as a DSPy module
    refuses bad inputs."""
    try:
        yield
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ValueError(err.details()) from None
        raise


def _piece(delta: pb.OutputDelta, last: bool) -> StreamResponse:
    return StreamResponse(predict_name=delta.predictor, signature_field_name=delta.field,
                          chunk=delta.text, is_last_chunk=last)  # fmt: skip


def typed_outputs(types: type[dspy.Signature] | dspy.Module | None) -> dict[str, Any]:
    """The output annotations of the author's signature or program (none: JSON as served)."""
    if types is None:
        return {}
    if isinstance(types, dspy.Module):
        return output_annotations(types)
    return {name: field.annotation for name, field in types.output_fields.items()}
