"""An OpenAI-compatible STAND-IN API on loopback, for what a real model cannot be made to do.

- `gold`: answers DSPy ChatAdapter prompts with the dataset's gold labels — the stand-in for a
  strong teacher (no strong model runs on this machine); with `reasoning`, a ChainOfThought
  teacher: a one-line reasoning naming the question's subject before the label. Asked as
  DSPy's SemanticF1 judge (ground_truth, system_response), it rates recall and precision by
  shared words — a stand-in for an LM judge. `usage` counts words, not a tokenizer's tokens;
  Asked to write a new input (a signature whose output is the program's input field, as the
  retrain loop's writer asks), it answers with an unused ticket of `pool` whose gold label is
  that of the first example shown: the stand-in for a strong LM writing a ticket like the
  ones the student got wrong, whose answer it knows; a `wavering` ticket gets another label
  when sampled at temperature 1 (an answer the teacher is unsure of);
- `slow`: answers after `delay_s` (timeouts);
- `error`: HTTP 500, echoing the Authorization header as some providers' errors do (a planted
  key must still never leak);
- `cut`: a streamed answer whose connection drops after its first piece, the answer's first
  half (a provider or network failing mid-answer).
A request with `stream: true` is answered as OpenAI streams: server-sent chunks of a few
characters, then the usage when `stream_options.include_usage` asks for it, then `[DONE]`.
Runs in a thread of the test or bench process; `mode` can be switched while it runs.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from testkit.json_http import JsonHandler

_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n|\Z)", re.S)
# ChatAdapter's system message: "Your output fields are:\n1. `name` (type): ..." (inputs too)
_OUTPUTS = re.compile(r"^\d+\. `(\w+)` \(([^)]*)\)", re.M)


class OpenAIStandIn:
    def __init__(
        self,
        gold: dict[str, str] | None = None,
        *,
        input_field: str = "ticket",
        output_field: str = "category",
        mode: str = "gold",
        delay_s: float = 0.0,
        reasoning: bool = False,
        pool: list[str] | None = None,
        wavering: set[str] | None = None,
    ) -> None:
        self.gold = gold or {}
        self.pool = list(pool or [])
        # Tickets whose label it changes when sampled at temperature 1 or more.
        self.wavering = set(wavering or ())
        self.written: list[str] = []
        self._pool_lock = threading.Lock()
        self.input_field = input_field
        self.output_field = output_field
        self.mode = mode
        self.delay_s = delay_s
        self.reasoning = reasoning
        self.requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, messages: list[dict[str, Any]], temperature: float = 0.0) -> str:
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        if isinstance(user, list):
            user = "".join(part.get("text", "") for part in user)
        fields = {name: value.strip() for name, value in _FIELD.findall(user)}
        if {"ground_truth", "system_response"} <= fields.keys():
            return judge(fields["ground_truth"], fields["system_response"])
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        types = dict(_OUTPUTS.findall(str(system)))
        wanted = [name for name in types if name not in fields]
        if self.input_field in wanted:
            return f"[[ ## {self.input_field} ## ]]\n{self.write(fields)}\n\n[[ ## completed ## ]]"
        if wanted and self.output_field not in wanted:
            # Another signature (a prompt optimizer's own: proposed instructions, summaries;
            # Refine's advice per module): a plain sentence for each field it asks for, an
            # empty object for a dict.
            parts = [f"[[ ## {name} ## ]]\n"
                     + ("{}" if types[name].startswith("dict") else "Answer precisely and briefly.")
                     + "\n\n" for name in wanted]  # fmt: skip
            return "".join(parts) + "[[ ## completed ## ]]"
        asked = fields.get(self.input_field, "").strip()
        label = self.gold.get(asked, "unknown")
        if asked in self.wavering and temperature >= 1:
            label = next(v for v in sorted(set(self.gold.values())) if v != label)
        # Other fields asked beside the label (MultiChainComparison's `rationale`): a sentence.
        extra = [name for name in wanted if name not in (self.output_field, "reasoning")]
        others = "".join(f"[[ ## {name} ## ]]\nAnswer precisely and briefly.\n\n" for name in extra)
        answer = f"{others}[[ ## {self.output_field} ## ]]\n{label}\n\n[[ ## completed ## ]]"
        if self.reasoning:
            subject = " ".join(asked.rstrip("?").split()[-3:])
            answer = f"[[ ## reasoning ## ]]\nThis asks about {subject}.\n\n" + answer
        return answer

    def write(self, fields: dict[str, str]) -> str:
        """An unused pool ticket with the first example's label (any unused one if none has
        it); the first example itself once the pool is spent."""
        shown = [json.loads(line) for line in fields.get("example_inputs", "").splitlines()
                 if line.strip().startswith("{")]  # fmt: skip
        first = str(shown[0].get(self.input_field, "")) if shown else ""
        wanted = self.gold.get(first)
        with self._pool_lock:
            unused = [t for t in self.pool if t not in self.written]
            alike = [t for t in unused if self.gold.get(t) == wanted]
            ticket = (alike or unused or [first])[0]
            self.written.append(ticket)
        return ticket

    def _handler(self) -> type[JsonHandler]:
        standin = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                self.send_json(200, {"data": [{"id": "gold-teacher", "object": "model"}]})

            def do_POST(self) -> None:
                body = self.read_json()
                standin.requests += 1
                if standin.mode == "error":
                    auth = self.headers.get("Authorization", "")
                    self.send_json(500, {"error": {"message": f"internal error for {auth}",
                                               "type": "server_error"}})  # fmt: skip
                    return
                if standin.mode == "slow":
                    time.sleep(standin.delay_s)
                messages = body.get("messages", [])
                content = standin.answer(messages, float(body.get("temperature") or 0))
                if standin.mode == "unparsable":  # a model that ignores the answer format
                    content = "I am not sure, sorry."
                prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
                usage = {"prompt_tokens": prompt_words, "completion_tokens": len(content.split()),
                         "total_tokens": prompt_words + len(content.split())}  # fmt: skip
                if body.get("stream"):
                    self.send_stream(content, usage, body)
                    return
                self.send_json(200, {
                    "id": "chatcmpl-standin", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", "gold-teacher"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": usage,
                })  # fmt: skip

            def send_stream(self, content: str, usage: dict[str, int], body: Any) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if standin.mode == "cut":
                    self.send_event(self.chunk({"content": content[: len(content) // 2]}, None))
                    self.close_connection = True  # no last chunk: the body is cut short
                    return
                for start in range(0, len(content), 5):
                    self.send_event(self.chunk({"content": content[start : start + 5]}, None))
                self.send_event(self.chunk({}, "stop"))
                if (body.get("stream_options") or {}).get("include_usage"):
                    self.send_event({**self.chunk({}, None), "choices": [], "usage": usage})
                self.send_event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")

            def chunk(self, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return {"id": "chatcmpl-standin", "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": "gold-teacher",
                        "choices": [choice]}  # fmt: skip

            def send_event(self, data: dict[str, Any] | str) -> None:
                text = data if isinstance(data, str) else json.dumps(data)
                event = f"data: {text}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()

        return Handler


def judge(reference: str, response: str) -> str:
    """SemanticF1's verdict by shared words: recall over the reference, precision over the
    response."""
    truth, said = (
        set(re.findall(r"\w+", reference.lower())),
        set(re.findall(r"\w+", response.lower())),
    )
    shared = len(truth & said)
    recall = shared / len(truth) if truth else 0.0
    precision = shared / len(said) if said else 0.0
    return (
        f"[[ ## reasoning ## ]]\n{shared} key words in common.\n\n"
        f"[[ ## recall ## ]]\n{recall:.3f}\n\n[[ ## precision ## ]]\n{precision:.3f}\n\n"
        "[[ ## completed ## ]]"
    )
