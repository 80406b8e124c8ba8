"""A small synchronous client for `edgedistill.v1.Inference` (runtime or router alike)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from pydantic_core import to_jsonable_python

from services.core.api import pb, pb_grpc
from services.core.security import channel, token_metadata


class InferenceClient:
    """Plain by default; TLS with `credentials` (security.channel_credentials), and a bearer
    token on every call with `token`."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = channel(
            target,
            credentials=credentials,
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self.metadata = token_metadata(token)
        self.stub = pb_grpc.InferenceStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def predict(
        self,
        inputs: Mapping[str, Any],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        include_raw_text: bool = False,
    ) -> pb.PredictResponse:
        request = _predict_request(inputs, max_tokens, temperature, include_raw_text)
        response: pb.PredictResponse = self.stub.Predict(
            request, timeout=self.timeout_s, metadata=self.metadata
        )
        return response

    def predict_stream(
        self,
        inputs: Mapping[str, Any],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        include_raw_text: bool = False,
    ) -> Iterator[pb.PredictChunk]:
        """Predict, each output value's text as it is written (`delta` chunks), then the
        response (the last chunk's `response`)."""
        request = _predict_request(inputs, max_tokens, temperature, include_raw_text)
        chunks: Iterator[pb.PredictChunk] = self.stub.PredictStream(
            request, timeout=self.timeout_s, metadata=self.metadata
        )
        return chunks

    def generate(
        self,
        messages: Sequence[tuple[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        json_schema: str = "",
        grammar: str = "",
        logit_bias: Mapping[int, float] | None = None,
        prompt: str = "",
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Iterator[pb.GenerateChunk]:
        """A chat (`messages`), or with `prompt` (and no messages) a text continued as is;
        with `json_schema` or `grammar` (GBNF) the output follows it; with `logprobs`, each
        chunk carries its tokens' log-probabilities."""
        options = sampling(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, seed=seed,
        )  # fmt: skip
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
            options=options,
            stop=list(stop),
            json_schema=json_schema,
            grammar=grammar,
            logit_bias=logit_bias,
            prompt=prompt,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        chunks: Iterator[pb.GenerateChunk] = self.stub.Generate(
            request, timeout=self.timeout_s, metadata=self.metadata
        )
        return chunks

    def tokenize(
        self, messages: Sequence[tuple[str, str]] = (), *, prompt: str = "", bare: bool = False,
        with_pieces: bool = False,
    ) -> pb.TokenizeResponse:  # fmt: skip
        """The model's tokens for a chat, or a text (`bare`: without the beginning-of-text
        token), as Generate prompts it."""
        request = pb.TokenizeRequest(
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], prompt=prompt,
            bare=bare, with_pieces=with_pieces,
        )  # fmt: skip
        reply: pb.TokenizeResponse = self.stub.Tokenize(
            request, timeout=self.timeout_s, metadata=self.metadata
        )
        return reply

    def detokenize(self, tokens: Sequence[int]) -> str:
        request = pb.DetokenizeRequest(tokens=list(tokens))
        reply: pb.DetokenizeResponse = self.stub.Detokenize(
            request, timeout=self.timeout_s, metadata=self.metadata
        )
        return reply.text

    def embed(
        self, texts: Sequence[str], *, truncate: bool = False, normalize: bool = True
    ) -> pb.EmbedResponse:
        """Each text's vector from the served model (unit length unless `normalize` is off)."""
        request = pb.EmbedRequest(inputs=list(texts), truncate=truncate, normalize=normalize)
        reply: pb.EmbedResponse = self.stub.Embed(
            request, timeout=self.timeout_s, metadata=self.metadata
        )
        return reply

    def info(self) -> pb.ModelInfo:
        reply: pb.ModelInfo = self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata
        )
        return reply


def sampling(**values: Any) -> pb.SamplingOptions:
    """SamplingOptions with only the given (non-None) fields set."""
    return pb.SamplingOptions(**{k: v for k, v in values.items() if v is not None})


def _predict_request(
    inputs: Mapping[str, Any], max_tokens: int | None, temperature: float | None,
    include_raw_text: bool,
) -> pb.PredictRequest:  # fmt: skip
    texts = {name: value for name, value in inputs.items() if isinstance(value, str)}
    typed = {name: value for name, value in inputs.items() if name not in texts}
    return pb.PredictRequest(
        inputs=texts,
        inputs_json=json.dumps(to_jsonable_python(typed), ensure_ascii=False) if typed else "",
        options=sampling(max_tokens=max_tokens, temperature=temperature),
        include_raw_text=include_raw_text,
    )
