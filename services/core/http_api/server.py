"""The HTTP server (I/O only). It is a gRPC client of its own process over a private Unix
socket: every call goes through the same checks, limits, scheduler, metrics and bearer-token
interceptor as a gRPC one, and TLS on the gRPC port is TLS here too.

    POST /v1/chat/completions   OpenAI's chat completions (streamed or not) over Generate
    POST /v1/completions        OpenAI's text completions: a prompt continued as it is
    GET  /v1/models             the served model, as OpenAI lists models
    POST /v1/predict            the distilled program (PredictRequest / PredictResponse JSON)
    POST /tokenize, /detokenize llama.cpp server's: the model's tokens for a text or a chat
    POST /completion            llama.cpp server's own text completion (streamed or not)
    POST /apply-template        llama.cpp server's: a chat as the prompt text the model gets
    GET  /health                200 when serving, 503 while loading or draining
    POST /api/chat, /api/generate, /api/show; GET /api/tags, /api/ps, /api/version
                                Ollama's API (NDJSON streams; errors as {"error": ...})
    GET, HEAD /                 200: a server is here (as Ollama's root answers)
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.api import pb, pb_grpc
from services.core.http_api import embeddings, llama_server, ollama, responses, tokens
from services.core.http_api.chat import (
    BadRequest,
    ChatCompletionRequest,
    completion,
    error_body,
    generate_request,
    http_status,
    parse_body,
    parse_request,
    rpc_param,
    stream_events,
)
from services.core.http_api.choices import Interleaved, choice_calls
from services.core.http_api.completions import (
    CompletionRequest,
    completion_call,
    text_completion,
    text_stream_events,
)
from services.core.http_api.predict import predict_answer, predict_events, predict_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
Metadata = tuple[tuple[str, str], ...]


class HttpFront:
    """The HTTP API on host:port, calling the gRPC server at `target` (its private socket)."""

    def __init__(
        self, target: str, host: str, port: int, tls: ssl.SSLContext | None,
        allowed_origins: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.allowed_origins = allowed_origins
        self._channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self._channel)
        self.health = health_pb2_grpc.HealthStub(self._channel)
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
        self._names: dict[Metadata, str] = {}

    def start(self) -> None:
        threading.Thread(target=self._httpd.serve_forever, name="http-api", daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._channel.close()

    def model_info(self, metadata: Metadata) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)

    def model_name(self, metadata: Metadata) -> str:
        # Kept per credential once GetModelInfo let it through: a caller whose token the
        # server refuses never gets the name, and a chat call costs no extra RPC after its first.
        name = self._names.get(metadata)
        if name is None:
            name = self._names[metadata] = str(self.model_info(metadata).model_name)
        return name


def mount(server: grpc.aio.Server, settings: Any) -> HttpFront | None:
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
    origins = tuple(settings.http_allowed_origins)
    return HttpFront(target, settings.host, settings.http_port, tls, origins)


def tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """HTTPS with the gRPC port's certificate (and its client CA: mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _handler(front: HttpFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgedistill"
        protocol_version = "HTTP/1.1"  # keep-alive: every answer gives its length, or closes
        timeout = 300  # seconds a silent connection is kept

        def setup(self) -> None:
            super().setup()
            # Headers and body are two writes: with Nagle the body would wait for the client's
            # delayed ACK of the headers (up to 40 ms), and so would each streamed token.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http " + format, *args)

        def end_headers(self) -> None:
            # CORS: a page of an allowed origin may read the answer (the token still applies).
            # No headers yet when the request line itself was bad (send_error's 400).
            headers = getattr(self, "headers", None)
            origin = headers.get("Origin") if headers is not None else None
            if origin and self._origin_allowed(origin):
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Vary", "Origin")
            super().end_headers()

        def do_OPTIONS(self) -> None:  # a browser's preflight before a cross-origin call
            origin = self.headers.get("Origin") or ""
            if not self._origin_allowed(origin):
                why = (f"origin {origin!r} may not call this API from a browser; start the "
                       "server with --http-allowed-origins ORIGIN")  # fmt: skip
                return self._send_error(403, "permission_error", why, None)
            self.send_response(204)
            self.send_header("Access-Control-Allow-Methods", "GET, POST, HEAD, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _origin_allowed(self, origin: str) -> bool:
            allowed = front.allowed_origins
            return bool(origin) and ("*" in allowed or origin in allowed)

        def do_GET(self) -> None:
            routes = {"/v1/models": self._models, "/models": self._models,
                      "/health": self._health, "/api/tags": self._ollama_tags,
                      "/api/ps": self._ollama_ps, "/api/version": self._ollama_version,
                      "/props": self._props, "/slots": self._slots,
                      "": self._root}  # fmt: skip
            self._route(routes, with_body=False)

        def do_HEAD(self) -> None:  # Ollama's CLI checks that a server is there with HEAD /
            if self._route_path() == "":
                return self._root(with_body=False)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            routes = {"/v1/chat/completions": self._chat, "/chat/completions": self._chat,
                      "/v1/completions": self._complete, "/completions": self._complete,
                      "/v1/predict": self._predict, "/api/chat": self._ollama_chat,
                      "/tokenize": self._tokenize, "/detokenize": self._detokenize,
                      "/completion": self._llama_complete,
                      "/apply-template": self._apply_template,
                      "/api/generate": self._ollama_generate,
                      "/v1/embeddings": self._embeddings, "/embeddings": self._embeddings,
                      "/api/embed": self._ollama_embed, "/api/embeddings": self._ollama_embed,
                      "/v1/responses": self._responses, "/responses": self._responses,
                      "/api/show": self._ollama_show}  # fmt: skip
            self._route(routes, with_body=True)

        def _route(self, routes: dict[str, Any], with_body: bool) -> None:
            try:
                body = self._body() if with_body else b""  # read whatever the route: keep-alive
                handle = routes.get(self._route_path())
                if (
                    handle is None
                    and not with_body
                    and self._route_path().startswith(("/v1/models/", "/models/"))
                ):  # OpenAI's one model: /v1/models/NAME
                    handle = self._model
                if handle is None:
                    return self._send_error(404, "invalid_request_error", self._unrouted(), None)
                handle(body) if with_body else handle()
            except BadRequest as err:
                self._send_error(400, "invalid_request_error", str(err), err.param)
            except ollama.ModelNotFound as err:
                self._send_error(404, "invalid_request_error", str(err), "model")
            except grpc.RpcError as err:
                self._send_error(*self._rpc_error(err))

        def _route_path(self) -> str:
            return self.path.split("?")[0].rstrip("/")

        def _unrouted(self) -> str:
            if self._route_path().startswith("/api/"):
                return (f"{self.path} is not served: this server runs its bundle's model only "
                        "(/api/chat, generate, embed, embeddings, show, tags, ps, "
                        "version)")  # fmt: skip
            return f"no {self.path}"

        def _rpc_error(self, err: grpc.RpcError) -> tuple[int, str, str, str | None]:
            status, kind = http_status(err.code())
            details = err.details() or str(err.code())
            return status, kind, details, rpc_param(err.code(), details)

        def _body(self) -> bytes:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if self.headers.get("Transfer-Encoding"):  # chunked: not read here
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the body is not read: the connection cannot go on
                raise BadRequest("body", f"send a Content-Length of at most {MAX_BODY_BYTES} bytes")
            return self.rfile.read(length)

        def _metadata(self) -> Metadata:
            given = self.headers.get("Authorization")
            return (("authorization", given),) if given else ()

        def _models(self) -> None:
            name = front.model_info(self._metadata()).model_name  # asked each time: a listing
            self._send_json(200, {"object": "list", "data": [openai_model(name)]})

        def _model(self) -> None:
            asked = urllib.parse.unquote(self._route_path().split("/models/", 1)[1])
            name = front.model_info(self._metadata()).model_name
            if asked not in ollama.served_names(name):
                raise ollama.ModelNotFound(f"model '{asked}' does not exist; this server "
                                           f"serves '{name}'")  # fmt: skip
            self._send_json(200, openai_model(name))

        def _health(self) -> None:
            reply = front.health.Check(
                health_pb2.HealthCheckRequest(), metadata=self._metadata(), timeout=5
            )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            self._send_json(200 if serving else 503, {"status": "ok" if serving else "unavailable"})

        def _tokenize(self, raw: bytes) -> None:
            call = tokens.tokenize_call(parse_body(tokens.TokenizeBody, raw))
            self._send_json(200, tokens.tokenize_answer(
                front.stub.Tokenize(call, metadata=self._metadata())))  # fmt: skip

        def _detokenize(self, raw: bytes) -> None:
            call = tokens.detokenize_call(parse_body(tokens.DetokenizeBody, raw))
            reply = front.stub.Detokenize(call, metadata=self._metadata())
            self._send_json(200, {"content": reply.text})

        def _llama_complete(self, raw: bytes) -> None:
            body = parse_body(llama_server.CompletionBody, raw)
            metadata = self._metadata()
            model = front.model_name(metadata)
            chunks = front.stub.Generate(llama_server.completion_call(body), metadata=metadata)
            if not body.stream:
                answer = llama_server.completion_answer(list(chunks), model, body.prompt)
                return self._send_json(200, answer)
            self._stream(chunks, lambda pieces: llama_server.completion_events(
                pieces, model, body.prompt))  # fmt: skip

        def _props(self) -> None:
            info = front.model_info(self._metadata())
            self._send_json(200, llama_server.props_answer(info))

        def _slots(self) -> None:
            slots = llama_server.slots_answer(front.model_info(self._metadata()))
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if query.get("fail_on_no_slot", ["0"])[-1] not in ("0", "false", "") and (
                llama_server.no_free_slot(slots)
            ):
                return self._send_error(503, "unavailable_error", "no slot available", None)
            self._send_json(200, slots)

        def _apply_template(self, raw: bytes) -> None:
            call = llama_server.template_call(parse_body(llama_server.TemplateBody, raw))
            reply = front.stub.Tokenize(call, metadata=self._metadata())
            self._send_json(200, llama_server.template_answer(reply))

        def _predict(self, raw: bytes) -> None:
            request, stream = predict_request(raw)
            if stream:
                chunks = front.stub.PredictStream(request, metadata=self._metadata())
                return self._stream(chunks, predict_events)
            reply = front.stub.Predict(request, metadata=self._metadata())
            self._send_json(200, predict_answer(reply))

        def _chat(self, raw: bytes) -> None:
            request = parse_request(raw)
            self._openai_answer(request, generate_request(request), "chatcmpl", completion,
                                stream_events)  # fmt: skip

        def _complete(self, raw: bytes) -> None:
            request = parse_body(CompletionRequest, raw)
            self._openai_answer(request, completion_call(request), "cmpl", text_completion,
                                text_stream_events)  # fmt: skip

        def _openai_answer(
            self, request: ChatCompletionRequest | CompletionRequest, call: pb.GenerateRequest,
            kind: str, whole: Callable[..., dict[str, Any]], events: Callable[..., Any],
        ) -> None:  # fmt: skip
            """A chat or text completion: whole, or streamed as server-sent events."""
            metadata = self._metadata()
            model = front.model_name(metadata)
            streams = [front.stub.Generate(choice, metadata=metadata)
                       for choice in choice_calls(call, request.n)]  # fmt: skip
            call_id = f"{kind}-{uuid.uuid4().hex}"
            if not request.stream:
                try:
                    choices = [list(stream) for stream in streams]
                finally:
                    for stream in streams:  # one failed: the others stop too
                        stream.cancel()
                return self._send_json(200, whole(choices, model, call_id, call.logprobs))
            include = bool(request.stream_options and request.stream_options.include_usage)
            self._stream(Interleaved(streams), lambda pieces: events(
                pieces, model, call_id, include, call.logprobs, request.n))  # fmt: skip

        def _responses(self, raw: bytes) -> None:
            body = parse_body(responses.ResponsesBody, raw)
            call = responses.responses_call(body)
            metadata = self._metadata()
            model = front.model_name(metadata)
            chunks = front.stub.Generate(call, metadata=metadata)
            ids = responses.Ids(f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}")
            if not body.stream:
                return self._send_json(200, responses.response_object(list(chunks), body, model,
                                                                      ids))  # fmt: skip
            self._stream(chunks, lambda pieces: responses.response_events(pieces, body, model,
                                                                          ids))  # fmt: skip

        def _ollama_chat(self, raw: bytes) -> None:
            request = parse_body(ollama.ChatRequest, raw)
            self._ollama_answer(request, ollama.chat_call(request), chat=True)

        def _ollama_generate(self, raw: bytes) -> None:
            request = parse_body(ollama.GenerateRequest, raw)
            self._ollama_answer(request, ollama.generate_call(request), chat=False)

        def _ollama_answer(
            self, request: ollama.ChatRequest | ollama.GenerateRequest,
            call: pb.GenerateRequest | None, chat: bool,
        ) -> None:  # fmt: skip
            metadata = self._metadata()
            ollama.check_model(request.model, front.model_name(metadata))
            if call is None:
                return self._send_json(200, ollama.loaded(request.model, chat))
            chunks = front.stub.Generate(call, metadata=metadata)
            wanted = call.logprobs
            if not request.stream:
                whole = ollama.whole_answer(list(chunks), request.model, chat, wanted)
                return self._send_json(200, whole)
            self._stream(chunks, lambda all_chunks: ollama.answer_lines(all_chunks, request.model,
                                                                        chat, wanted))  # fmt: skip

        def _embeddings(self, raw: bytes) -> None:
            body = parse_body(embeddings.OpenAIBody, raw)
            metadata = self._metadata()
            reply = front.stub.Embed(embeddings.openai_call(body), metadata=metadata)
            answer = embeddings.openai_answer(reply, body, reply.model_id)
            self._send_json(200, answer)

        def _ollama_embed(self, raw: bytes) -> None:
            """`/api/embed`, or the older `/api/embeddings` (OLLAMA_ROUTES says how)."""
            started = time.perf_counter()
            route = embeddings.OLLAMA_ROUTES[self._route_path()]
            body = parse_body(route.body, raw)
            metadata = self._metadata()
            ollama.check_model(body.model, front.model_name(metadata))
            call = route.call(body)
            reply = front.stub.Embed(call, metadata=metadata) if call else None
            self._send_json(200, route.answer(reply, body, started))

        def _ollama_show(self, raw: bytes) -> None:
            asked = parse_body(ollama.ChatRequest, raw).model  # only `model` is read
            info = front.model_info(self._metadata())
            ollama.check_model(asked, info.model_name)
            self._send_json(200, ollama.shown(info))

        def _ollama_tags(self) -> None:
            self._send_json(200, ollama.tags(front.model_info(self._metadata())))

        def _ollama_ps(self) -> None:
            self._send_json(200, ollama.running(front.model_info(self._metadata())))

        def _root(self, with_body: bool = True) -> None:
            data = b"edgedistill is running (OpenAI's, Ollama's and /v1/predict HTTP APIs)"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def _ollama_version(self) -> None:
            self._send_json(200, {"version": ollama.VERSION})

        def _stream(self, chunks: Any, events: Callable[[Iterator[Any]], Iterator[Any]]) -> None:
            """The answer as it is generated: server-sent events for OpenAI's API, one JSON
            object per line for Ollama's."""
            first = next(chunks)  # an error before any text is still an HTTP status
            sse = not self._is_ollama()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream" if sse else "application/x-ndjson")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream's end is the connection's
            self.close_connection = True
            self.end_headers()

            typed = self._route_path() in ("/v1/responses", "/responses")

            def send(event: dict[str, Any]) -> None:
                line = f"data: {json.dumps(event)}\n\n" if sse else json.dumps(event) + "\n"
                if typed and "type" in event:  # Responses' events are named as OpenAI's are
                    line = f"event: {event['type']}\n{line}"
                self.wfile.write(line.encode())
                self.wfile.flush()

            try:
                for event in events(_chained(first, chunks)):
                    send(event)
                if sse and not typed and self._route_path() != "/completion":  # those end
                    self.wfile.write(b"data: [DONE]\n\n")  # unmarked: Responses, llama.cpp's
            except grpc.RpcError as err:  # after the status line: an error event in the stream
                send(self._error_body(*self._rpc_error(err)))
            except OSError:  # the client went away: stop the generation
                chunks.cancel()

        def _is_ollama(self) -> bool:
            return self._route_path().startswith("/api/")

        def _send_error(self, status: int, kind: str, message: str, param: str | None) -> None:
            self._send_json(status, self._error_body(status, kind, message, param))

        def _error_body(
            self, status: int, kind: str, message: str, param: str | None
        ) -> dict[str, Any]:
            in_route_terms = embeddings.IN_ROUTE_TERMS.get(self._route_path())
            if in_route_terms:  # Embed names `inputs[i]`; these routes name it otherwise
                message = in_route_terms(message)
                param = param and in_route_terms(param)
            if self._is_ollama():
                return {"error": ollama.in_ollama_terms(message)}  # Ollama's: one string
            return error_body(status, kind, message, param)

        def _send_json(self, status: int, body: Any) -> None:
            send_json(self, status, body)

    return Handler


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    """One JSON response, its length given: the connection stays open unless the request
    left it unusable (then the client is told, so it does not send the next call on it)."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    if handler.close_connection:
        handler.send_header("Connection", "close")
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def openai_model(name: str) -> dict[str, Any]:
    """The served model as OpenAI's API lists a model."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "edgedistill"}


def _chained(first: pb.GenerateChunk, rest: Iterator[pb.GenerateChunk]) -> Iterator[Any]:
    yield first
    yield from rest
