"""Predict over HTTP: the request and answer in protobuf's JSON mapping of PredictRequest and
PredictResponse (the proto's field names), with two conveniences for JSON clients: an input
may be any JSON value of its field's type (sent as `inputs_json`: the server checks it),
and `outputs_json` comes parsed, each output typed by its annotation (`outputs` listed in the
same order, the signature's). Pure functions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from google.protobuf import json_format

from services.core.api import pb
from services.core.http_api.chat import BadRequest


def predict_request(raw: bytes) -> tuple[pb.PredictRequest, bool]:
    """The Predict call a JSON body asks for, and whether it asks for it streamed (`"stream":
    true`: PredictStream), or BadRequest naming what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise BadRequest("body", f"not JSON ({err})") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
        raise BadRequest("inputs", 'send {"inputs": {"<input field>": <value>, ...}}')
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "true or false")
    # typed as JSON has them: the server knows each field's type (a null for a text field is
    # an error there, not the text "null")
    typed = {**body, "inputs": {}, "inputs_json": json.dumps(body["inputs"], ensure_ascii=False)}
    try:
        return json_format.ParseDict(typed, pb.PredictRequest()), stream
    except json_format.ParseError as err:
        raise BadRequest("body", str(err)) from None


def predict_events(chunks: Iterator[pb.PredictChunk]) -> Iterator[dict[str, Any]]:
    """PredictStream's chunks as JSON events: `{"delta": {"predictor", "field", "text",
    "served_by"}}` each, a router's `{"restart": {"served_by", "reason"}}` (the deltas before
    it are withdrawn), then `{"response": ...}`, the answer as the whole call gives it."""
    for chunk in chunks:
        if chunk.HasField("response"):
            yield {"response": predict_answer(chunk.response)}
        elif chunk.HasField("restart"):
            yield {"restart": json_format.MessageToDict(
                chunk.restart, preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )}  # fmt: skip
        else:
            delta = chunk.delta
            yield {"delta": {"predictor": delta.predictor, "field": delta.field,
                             "text": delta.text,
                             "served_by": pb.ServedBy.Name(delta.served_by)}}  # fmt: skip


def predict_answer(reply: pb.PredictResponse) -> dict[str, Any]:
    """The answer as JSON: every field of PredictResponse, `outputs_json` parsed."""
    body = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    typed = json.loads(reply.outputs_json) if reply.outputs_json else None
    # a proto map has no order: list the outputs in the signature's, as outputs_json has them
    outputs = body["outputs"]
    ordered = {name: outputs[name] for name in typed or () if name in outputs}
    body["outputs"] = {**ordered, **outputs}
    body["outputs_json"] = typed
    return body
