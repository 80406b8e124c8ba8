"""An OpenAI-compatible HTTP API over the Generate RPC (`POST /v1/chat/completions`, streamed
or not, and `GET /v1/models`), so a client written for an API model, llama.cpp's server or
Ollama (the `openai` package, LiteLLM, `dspy.LM("openai/...", api_base=...)`) talks to the
edge model unchanged. It is a gRPC client of its own server over a private Unix socket: every
call goes through the same checks, limits, scheduler, metrics and bearer-token interceptor as
a gRPC one, and TLS on the gRPC port is TLS here too."""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.api import pb, pb_grpc

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


class BadRequest(Exception):
    """A request body the API cannot take: HTTP 400 naming the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


# -- the request, as OpenAI's chat completions API defines it (unknown keys are ignored) -------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class JsonSchemaFormat(_Body):
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    # llama.cpp's server takes these too.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The body checked, or BadRequest naming the first parameter that is wrong."""
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequest(param, first["msg"]) from None


def generate_request(request: ChatCompletionRequest) -> pb.GenerateRequest:
    """The Generate call a chat completion request asks for."""
    if request.tools:
        raise BadRequest("tools", "tool calls are not served; describe the tools in a message")
    messages = [pb.ChatMessage(role="system" if m.role == "developer" else m.role,
                               content=_text(m.content)) for m in request.messages]  # fmt: skip
    options = pb.SamplingOptions(
        max_tokens=request.max_completion_tokens or request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        top_k=request.top_k,
        min_p=request.min_p,
        repeat_penalty=request.repeat_penalty,
    )
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    return pb.GenerateRequest(
        messages=messages, options=options, stop=stop, json_schema=_schema(request)
    )


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _schema(request: ChatCompletionRequest) -> str:
    wanted = request.response_format
    if wanted is None or wanted.type == "text":
        return ""
    if wanted.type == "json_object":
        return json.dumps({"type": "object"})
    if wanted.json_schema is None:
        raise BadRequest("response_format.json_schema", "json_schema needs its schema")
    return json.dumps(wanted.json_schema.schema_)


# -- the answer ------------------------------------------------------------------------------


def completion(chunks: list[pb.GenerateChunk], model: str, call_id: str) -> dict[str, Any]:
    """A `chat.completion` object from a whole Generate stream."""
    last = chunks[-1]
    return {
        "id": call_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
            "finish_reason": _FINISH.get(last.finish_reason, "stop"),
        }],
        "usage": usage(last.usage),
    }  # fmt: skip


def usage(counted: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": counted.prompt_tokens,
        "completion_tokens": counted.completion_tokens,
        "total_tokens": counted.prompt_tokens + counted.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": counted.cached_prompt_tokens},
    }


def stream_events(
    chunks: Iterator[pb.GenerateChunk], model: str, call_id: str, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """`chat.completion.chunk` objects: the role, each piece of text, the finish reason and,
    when asked for, the usage on a last chunk with no choices."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": call_id, "object": "chat.completion.chunk", "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    yield chunk({"role": "assistant", "content": ""}, None)
    for piece in chunks:
        if piece.text:
            yield chunk({"content": piece.text}, None)
        if piece.finish_reason:
            yield chunk({}, _FINISH.get(piece.finish_reason, "stop"))
            if include_usage:
                yield {"id": call_id, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [], "usage": usage(piece.usage)}  # fmt: skip


def error_body(status: int, kind: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    return _STATUS.get(code, (500, "server_error"))


# -- the server (I/O only) ---------------------------------------------------------------------


class OpenAIFront:
    """The HTTP API on host:port, calling the gRPC server at `target` (its private socket)."""

    def __init__(self, target: str, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.InferenceStub(self._channel)
        try:
            self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as err:
            raise OSError(f"http_port: cannot listen on {host}:{port} ({err.strerror}); choose "
                          "another --http-port, or 0 for no HTTP API") from None  # fmt: skip
        if tls is not None:
            # The handshake happens in the connection's own thread, not in accept(): a client
            # stalling it cannot hold up everyone else's.
            self._httpd.socket = tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self._httpd.serve_forever, name="openai-http", daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._channel.close()

    def model_name(self, metadata: tuple[tuple[str, str], ...]) -> str:
        # Asked each time, with the caller's token: never an answer to a caller without one.
        info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
        return str(info.model_name)

    def generate(self, request: pb.GenerateRequest, metadata: tuple[tuple[str, str], ...]) -> Any:
        return self._stub.Generate(request, metadata=metadata)


def mount(server: grpc.aio.Server, settings: Any) -> OpenAIFront | None:
    """The HTTP API when `settings.http_port` is set: its private socket is added to `server`
    (before the server starts); start() it once the server has."""
    if not settings.http_port:
        return None
    folder = Path(tempfile.mkdtemp(prefix="edgedistill-http-"))  # 0700: this user's alone
    atexit.register(shutil.rmtree, folder, True)  # however the server stops
    target = f"unix:{folder / 'grpc.sock'}"
    server.add_insecure_port(target)
    tls = None
    if settings.tls_cert is not None:
        tls = tls_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return OpenAIFront(target, settings.host, settings.http_port, tls)


def tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """HTTPS with the gRPC port's certificate (and its client CA: mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _handler(front: OpenAIFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgedistill"
        timeout = 300  # seconds a silent connection is kept

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http " + format, *args)

        def _metadata(self) -> tuple[tuple[str, str], ...]:
            given = self.headers.get("Authorization")
            return (("authorization", given),) if given else ()

        def do_GET(self) -> None:
            if self.path.rstrip("/") not in ("/v1/models", "/models"):
                return self._send_error(404, "invalid_request_error", f"no {self.path}", None)
            try:
                name = front.model_name(self._metadata())
            except grpc.RpcError as err:
                return self._send_rpc_error(err)
            listed = {"id": name, "object": "model", "created": 0, "owned_by": "edgedistill"}
            self._send_json(200, {"object": "list", "data": [listed]})

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._send_error(404, "invalid_request_error", f"no {self.path}", None)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._send_error(413, "invalid_request_error",
                                        f"body: over {MAX_BODY_BYTES} bytes", None)  # fmt: skip
            try:
                request = parse_request(self.rfile.read(length))
                call = generate_request(request)
            except BadRequest as err:
                return self._send_error(400, "invalid_request_error", str(err), err.param)
            metadata = self._metadata()
            call_id = f"chatcmpl-{uuid.uuid4().hex}"
            try:
                model = front.model_name(metadata)
                chunks = front.generate(call, metadata)
                if request.stream:
                    return self._stream(chunks, model, call_id, request)
                self._send_json(200, completion(list(chunks), model, call_id))
            except grpc.RpcError as err:
                self._send_rpc_error(err)

        def _stream(
            self, chunks: Any, model: str, call_id: str, request: ChatCompletionRequest
        ) -> None:
            first = next(chunks)  # an error before any text is still an HTTP status
            include = bool(request.stream_options and request.stream_options.include_usage)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                for event in stream_events(_chained(first, chunks), model, call_id, include):
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except grpc.RpcError as err:  # after the status line: an error event, as OpenAI's
                status, kind = http_status(err.code())
                body = error_body(status, kind, err.details() or "", None)
                self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
            except OSError:  # the client went away: stop the generation
                chunks.cancel()

        def _send_rpc_error(self, err: grpc.RpcError) -> None:
            status, kind = http_status(err.code())
            self._send_error(status, kind, err.details() or str(err.code()), None)

        def _send_error(self, status: int, kind: str, message: str, param: str | None) -> None:
            self._send_json(status, error_body(status, kind, message, param))

        def _send_json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _chained(first: pb.GenerateChunk, rest: Iterator[pb.GenerateChunk]) -> Iterator[Any]:
    yield first
    yield from rest
