"""A STAND-IN for an Ollama server (no Ollama can run on this machine).

It speaks the parts of Ollama's documented HTTP API the runtime's Ollama backend uses —
GET /api/version, GET /api/tags, POST /api/show, POST /api/chat (NDJSON streaming, or one
object with `"stream": false` as LiteLLM's `ollama_chat/` asks; options, format, logprobs),
POST /api/embed (unit vectors, mean-pooled, a long input cut unless `truncate` is false),
POST /v1/chat/completions (the OpenAI-compatible endpoint, which DSPy's `ollama_chat/` calls) —
and answers with a real model through llama-cpp-python, as Ollama itself runs llama.cpp.
Run: python -m testkit.ollama_standin --model X.gguf --name NAME --port P
"""

from __future__ import annotations

import argparse
import functools
import json
import threading
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from services.core.bundle import sha256_file
from testkit.json_http import JsonHandler


def make_handler(
    llm: Any, name: str, digest: str, lock: threading.Lock, embedder: Any = None
) -> type:
    class Handler(JsonHandler):
        def do_GET(self) -> None:
            if self.path == "/api/version":
                self.send_json(200, {"version": "0.12.0-standin"})
            elif self.path == "/api/tags":
                self.send_json(200, {"models": [{"name": name, "model": name, "digest": digest}]})
            else:
                self.send_json(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = self.read_json()
            if self.path == "/api/show":
                if self._unknown_model(body):
                    return
                self.send_json(
                    200,
                    {
                        "modelfile": f"FROM /root/.ollama/models/blobs/sha256-{digest}\n",
                        "details": {
                            "format": "gguf",
                            "family": "llama",
                            "quantization_level": "Q4_1",
                        },
                        "model_info": {
                            "general.architecture": "llama",
                            "llama.context_length": 8192,
                            "llama.embedding_length": llm.n_embd(),
                        },
                    },
                )
            elif self.path == "/api/chat":
                self._chat(body)
            elif self.path == "/v1/chat/completions":
                self._openai_chat(body)
            elif self.path == "/api/embed":
                self._embed(body)
            else:
                self.send_json(404, {"error": "not found"})

        def _chat(self, body: dict[str, Any]) -> None:
            if self._unknown_model(body):
                return
            options = body.get("options") or {}
            kwargs: dict[str, Any] = {
                "max_tokens": options.get("num_predict", 128),
                "temperature": options.get("temperature", 0.8),
                "top_p": options.get("top_p", 0.9),
                "top_k": options.get("top_k", 40),
                "min_p": options.get("min_p", 0.0),
                "repeat_penalty": options.get("repeat_penalty", 1.1),
                "stop": options.get("stop") or None,
                "stream": True,
            }
            if options.get("seed") is not None:
                kwargs["seed"] = options["seed"]
            if body.get("logprobs"):
                kwargs["logprobs"] = True
                kwargs["top_logprobs"] = body.get("top_logprobs") or 1
            if isinstance(body.get("format"), dict):
                kwargs["response_format"] = {"type": "json_object", "schema": body["format"]}
            if body.get("stream") is False:  # one JSON object, as Ollama answers then
                self._chat_whole(body, kwargs)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with lock:
                count, reason = 0, "stop"
                for chunk in llm.create_chat_completion(body.get("messages", []), **kwargs):
                    choice = chunk["choices"][0]
                    piece = choice["delta"].get("content") or ""
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                    if not piece:
                        continue
                    count += 1
                    line: dict[str, Any] = {
                        "model": name,
                        "created_at": datetime.now(UTC).isoformat(),
                        "message": {"role": "assistant", "content": piece},
                        "done": False,
                    }
                    logprobs = (choice.get("logprobs") or {}).get("content") or []
                    if logprobs:
                        line["logprobs"] = [
                            {"token": lp["token"], "logprob": lp["logprob"],
                             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                                              for t in lp.get("top_logprobs") or []]}
                            for lp in logprobs
                        ]  # fmt: skip
                    if not self._send_line(line):
                        return  # client went away: stop generating, as Ollama does
                prompt_tokens = llm.n_tokens - count
                self._send_line(
                    {
                        "model": name,
                        "created_at": datetime.now(UTC).isoformat(),
                        "message": {"role": "assistant", "content": ""},
                        "done": True,
                        "done_reason": "length" if reason == "length" else "stop",
                        "prompt_eval_count": max(prompt_tokens, 0),
                        "eval_count": count,
                    }
                )
            self.wfile.write(b"0\r\n\r\n")

        def _embed(self, body: dict[str, Any]) -> None:
            if self._unknown_model(body):
                return
            given = body.get("input", [])
            texts = [given] if isinstance(given, str) else given
            model = embedder()
            tokens = [model.tokenize(text.encode()) for text in texts]
            if not body.get("truncate", True) and any(len(t) > model.n_ctx() for t in tokens):
                self.send_json(400, {"error": "the input length exceeds the context length"})
                return
            with lock:
                vectors = model.embed(texts, normalize=True, truncate=True)
            self.send_json(200, {"model": name, "embeddings": vectors,
                                 "prompt_eval_count": sum(min(len(t), model.n_ctx())
                                                          for t in tokens)})  # fmt: skip

        def _unknown_model(self, body: dict[str, Any], openai: bool = False) -> bool:
            """Answers 404 for a model this server does not have, in the API's error shape."""
            if body.get("model") in (name, f"{name}:latest"):
                return False
            message = f"model '{body.get('model')}' not found"
            self.send_json(404, {"error": {"message": message} if openai else message})
            return True

        def _openai_chat(self, body: dict[str, Any]) -> None:
            """Ollama's OpenAI-compatible endpoint (DSPy's `ollama_chat/` calls it), unstreamed."""
            if self._unknown_model(body, openai=True):
                return
            keys = ("max_tokens", "temperature", "top_p", "stop", "seed")
            kwargs = {k: body[k] for k in keys if body.get(k) is not None}
            with lock:
                reply = llm.create_chat_completion(body.get("messages", []), **kwargs)
            self.send_json(200, {**reply, "model": name})

        def _chat_whole(self, body: dict[str, Any], kwargs: dict[str, Any]) -> None:
            with lock:
                reply = llm.create_chat_completion(
                    body.get("messages", []), **{**kwargs, "stream": False}
                )
            choice, usage = reply["choices"][0], reply["usage"]
            reason = "length" if choice["finish_reason"] == "length" else "stop"
            self.send_json(200, {
                "model": name, "created_at": datetime.now(UTC).isoformat(),
                "message": {"role": "assistant", "content": choice["message"]["content"] or ""},
                "done": True, "done_reason": reason, "prompt_eval_count": usage["prompt_tokens"],
                "eval_count": usage["completion_tokens"],
            })  # fmt: skip

        def _send_line(self, payload: dict[str, Any]) -> bool:
            data = json.dumps(payload).encode() + b"\n"
            try:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return False
            return True

    return Handler


def main() -> None:
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    llm = Llama(str(args.model), n_ctx=2048, n_threads=2, logits_all=True, verbose=False)

    @functools.cache
    def embedder() -> Any:  # as Ollama loads a model for embedding when first asked
        return Llama(str(args.model), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN,
                     n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, verbose=False)  # fmt: skip

    handler = make_handler(llm, args.name, sha256_file(args.model), threading.Lock(), embedder)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"ollama stand-in listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
