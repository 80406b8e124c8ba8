"""Every knob of the serving side, typed, in one place (cf. Ollama's envconfig).

Each setting reads `EDGEDISTILL_<NAME>` from the environment and has a CLI flag
`--<name-with-dashes>`; flags win over the environment. A wrong value fails at start with a
message naming the setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.sampling import MAX_TOKENS_DEFAULT, MAX_TOKENS_LIMIT

ENV_PREFIX = "EDGEDISTILL_"
S = TypeVar("S", bound=BaseSettings)


# llama.cpp's KV cache number types (its --cache-type-k/-v names); the runtime maps each to
# ggml's type of the same name (GGML_TYPE_Q8_0 …).
KvCacheType = Literal["f16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]


class SettingsError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""


# A web origin as browsers send it: scheme, host and optional port, no path.
ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")


class TransportSettings(BaseSettings):
    """TLS, mutual TLS and bearer-token auth: the same settings on the runtime and the router."""

    tls_cert: Path | None = Field(
        None, description="server certificate chain (PEM); with --tls-key the server speaks TLS"
    )
    tls_key: Path | None = Field(None, description="private key of --tls-cert (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="CA (PEM) that client certificates must chain to: mutual TLS"
    )
    auth_token_file: Path | None = Field(
        None,
        description="file holding the bearer token every call must carry "
        "(or the variable <prefix>AUTH_TOKEN); unset: no token needed",
    )
    health_requires_auth: bool = Field(
        False, description="health checks need the token too (default: open, for probes)"
    )
    http_port: int = Field(
        0, ge=0, le=65535,
        description="HTTP API port (OpenAI's /v1/chat/completions and /v1/models, "
        "Ollama's /api/chat, /api/generate, /api/tags, /v1/predict, /health), with the same "
        "TLS and token; 0: none",
    )  # fmt: skip
    http_allowed_origins: list[str] = Field(
        default_factory=list,
        description="web pages allowed to call the HTTP API from a browser (CORS; repeat): "
        "an origin like http://dashboard.local:3000, or * for any; none by default",
    )

    def auth_token(self) -> str | None:
        """The token from auth_token_file, else from the <prefix>AUTH_TOKEN variable."""
        if self.auth_token_file is not None:
            return self.auth_token_file.read_text().strip()
        return os.environ.get(f"{self.model_config.get('env_prefix', '')}AUTH_TOKEN") or None

    @model_validator(mode="after")
    def _transport_consistent(self) -> TransportSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mutual TLS needs --tls-cert and --tls-key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if self.auth_token_file is not None and not self.auth_token_file.read_text().strip():
            raise ValueError(f"auth_token_file: {self.auth_token_file} is empty")
        for origin in self.http_allowed_origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"http_allowed_origins: {origin!r} is not an origin; write "
                                 "scheme://host[:port] (no path), or * for any")  # fmt: skip
        return self


class RuntimeSettings(TransportSettings):
    """Settings of the runtime container (`edgedistill serve`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, env_ignore_empty=True
    )

    model: Path | None = Field(None, description="GGUF file to serve (or use --bundle)")
    program: Path | None = Field(
        None, description="program.json of the DSPy program to serve with --model"
    )
    bundle: Path | None = Field(None, description="bundle directory (GGUF + program + manifest)")
    allow_failed_gate: bool = Field(
        False, description="serve a bundle whose model failed the build's quality gate"
    )
    variant: str | None = Field(
        None, description="which of the bundle's GGUFs to serve, e.g. Q4_K_M (default: manifest)"
    )
    # The runtime adds each registered backend's own settings and checks the name
    # (services/runtime/settings.py); the core knows no backend.
    backend: str = Field(
        "llama.cpp", description="llama.cpp in-process, or ollama: an existing Ollama server"
    )

    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Prometheus metrics port (0 disables metrics)"
    )

    n_ctx: int = Field(4096, ge=256, le=131072, description="context length in tokens")
    n_threads: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        le=512,
        description="CPU threads for llama.cpp",
    )
    n_batch: int = Field(
        512, ge=8, le=8192, description="prompt tokens evaluated per step (per call)"
    )
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to a GPU (-1: all)")
    kv_cache_type: KvCacheType = Field(
        "f16",
        description=(
            "the number type of the generation KV cache, as llama.cpp's --cache-type-k/-v: "
            "q8_0 halves its memory, q4_0 quarters it, at a small cost in accuracy (a quantized "
            "cache runs with flash attention, as llama.cpp needs for it)"
        ),
    )
    embed_ctx: int = Field(
        2048,
        ge=16,
        le=131072,
        description=(
            "the longest text Embed reads, in tokens (at most n_ctx): its context and buffers "
            "are made on the first Embed call and grow with this"
        ),
    )

    parallel: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "requests decoded together in one llama.cpp context (continuous batching); "
            "1: one at a time"
        ),
    )
    prefix_cache: bool = Field(
        True,
        description=(
            "keep the program's fixed prompt prefix evaluated (each predictor's): with "
            "parallel > 1 in reserved KV sequences shared with every Predict; with parallel 1 "
            "as a saved state restored after other calls (a Generate) came between"
        ),
    )
    typed_decoding: bool = Field(
        True,
        description=(
            "Predict answers decoded by their signature: field headers appended, not sampled; "
            "Literal and bool values only from their set, numbers as numbers, lists and "
            "objects as JSON of their schema (off: the model samples the whole answer)"
        ),
    )
    max_queue: int = Field(
        16,
        ge=0,
        le=10000,
        description="requests that may wait for the model; beyond, RESOURCE_EXHAUSTED",
    )
    max_tokens_default: int = Field(
        MAX_TOKENS_DEFAULT, ge=1, description="max_tokens when a call sets none"
    )
    max_tokens_limit: int = Field(
        MAX_TOKENS_LIMIT, ge=1, description="largest max_tokens a call may ask for"
    )
    max_request_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="largest request a call may send, in bytes"
    )
    grace_period_s: float = Field(
        15.0, ge=0, le=600, description="on SIGTERM, how long in-flight calls may finish"
    )
    max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="close client connections this old (after grace_period_s for their calls), "
        "so gRPC clients re-resolve DNS and find new replicas (e.g. 60 behind a headless "
        "Service)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_requests: bool = Field(False, description="log request and response contents")

    @model_validator(mode="after")
    def _one_model_source(self) -> RuntimeSettings:
        if self.model is not None and self.bundle is not None:
            raise ValueError("model: give exactly one of --model PATH.gguf or --bundle DIR")
        self.check_backend()
        if self.bundle is not None and self.program is not None:
            raise ValueError("program: --program goes with --model; a bundle carries its own")
        for name in ("model", "program", "bundle"):
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise ValueError(f"{name}: {path} does not exist")
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError("max_tokens_default: larger than max_tokens_limit")
        return self

    def check_backend(self) -> None:
        """What the chosen backend needs; the runtime's settings ask the backend itself."""
        if self.model is None and self.bundle is None:
            raise ValueError("model: give exactly one of --model PATH.gguf or --bundle DIR")


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment plus explicit overrides (CLI flags).

    Raises SettingsError with one line per wrong setting, each naming the flag and variable.
    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**clean)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            loc = ".".join(str(p) for p in problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            if not loc and ":" in message:
                loc, message = (s.strip() for s in message.split(":", 1))
            if loc:
                variable = cls.model_config.get("env_prefix", ENV_PREFIX) + loc.upper()
                names = (
                    variable
                    if getattr(cls, "env_only", False)
                    else ("--" + loc.replace("_", "-") + " / " + variable)
                )
                lines.append(f"{loc} ({names}): {message}")
            else:
                lines.append(message)
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


class RouterSettings(TransportSettings):
    """Settings of the router container (`edgedistill route`). Variables: EDGEDISTILL_ROUTER_*."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX + "ROUTER_", extra="forbid", frozen=True, env_ignore_empty=True
    )

    bundle: Path = Field(description="the bundle (program signature and calibration)")
    allow_failed_gate: bool = Field(
        False, description="route for a bundle whose model failed the build's quality gate"
    )
    local: list[str] = Field(
        min_length=1,
        description="runtimes: HOST:PORT (repeat) or a gRPC target URI "
        "(dns:///NAME:PORT, ipv4:ADDR:PORT,ADDR:PORT); gRPC balances round-robin over the "
        "SERVING ones",
    )
    host: str = Field("127.0.0.1", description="address the router binds")
    port: int = Field(50052, ge=0, le=65535, description="router gRPC port (0 picks one)")
    metrics_port: int = Field(9465, ge=0, le=65535, description="Prometheus port (0 disables)")

    mode: Literal["local_only", "hybrid", "api_only"] = Field(
        "hybrid", description="who answers Predict"
    )
    confidence: Literal["logprob", "self_check"] = Field(
        "logprob",
        description="logprob: the runtime's token-probability confidence (default); "
        "self_check: ask the local model whether its answer is right",
    )
    threshold: float | None = Field(
        None, ge=0, le=1.01, description="confidence threshold (default: the bundle's calibration)"
    )

    fallback_model: str | None = Field(
        None, description="the API model for fallbacks, a DSPy model string (e.g. openai/gpt-4o)"
    )
    fallback_api_base: str | None = Field(None, description="OpenAI-compatible base URL")
    fallback_key_env: str | None = Field(
        None, description="environment variable holding the API key"
    )
    fallback_key_file: Path | None = Field(
        None, description="file holding the API key (e.g. a mounted secret)"
    )
    api_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="timeout of one API call (for a streamed Generate, of each piece)",
    )
    api_retries: int = Field(1, ge=0, le=10, description="retries after a failed API call")
    api_backoff_s: float = Field(0.2, ge=0, le=30, description="first retry delay (doubles)")
    breaker_failures: int = Field(
        3, ge=1, le=1000, description="consecutive API failures that open the circuit"
    )
    breaker_reset_s: float = Field(
        30.0, gt=0, le=3600, description="open circuit: seconds before a half-open probe"
    )
    max_fallback_rate: float = Field(
        1.0, ge=0, le=1, description="cap on the fraction of recent calls sent to the API"
    )
    fallback_rate_window: int = Field(
        200, ge=1, le=100000, description="recent calls the fallback-rate cap looks at"
    )
    budget_per_minute: int | None = Field(None, ge=0, description="API calls allowed per minute")
    budget_per_day: int | None = Field(None, ge=0, description="API calls allowed per day")
    local_timeout_s: float = Field(
        60.0, gt=0, le=600, description="timeout of one call to a runtime"
    )
    local_tls_ca: Path | None = Field(
        None, description="CA (PEM) to verify the runtimes' certificates: TLS to the runtimes"
    )
    local_tls_cert: Path | None = Field(
        None, description="client certificate (PEM) presented to the runtimes (mutual TLS)"
    )
    local_tls_key: Path | None = Field(None, description="private key of --local-tls-cert")
    local_token_file: Path | None = Field(
        None,
        description="file holding the runtimes' bearer token "
        "(or the variable EDGEDISTILL_ROUTER_LOCAL_TOKEN)",
    )
    harvest: Path | None = Field(
        None,
        description="record every fallback (inputs, local and API answers) in this folder for "
        "retraining: it STORES REQUEST CONTENTS on this host (files 0600; never keys or tokens)",
    )
    harvest_sample_rate: float = Field(
        0.0, ge=0, le=1, description="with --harvest, also record this fraction of local answers"
    )
    harvest_max_file_mb: float = Field(
        16.0, gt=0, le=4096, description="with --harvest, start a new file past this size"
    )
    harvest_max_records: int | None = Field(
        100_000, ge=1, description="with --harvest, remove the oldest files past this many records"
    )
    harvest_max_age_days: float | None = Field(
        None, gt=0, description="with --harvest, remove files older than this"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _fallback_complete(self) -> RouterSettings:
        if self.harvest is None and self.harvest_sample_rate > 0:
            raise ValueError("harvest_sample_rate: set --harvest DIR to record samples")
        if not self.bundle.is_dir():
            raise ValueError(f"bundle: {self.bundle} is not a directory")
        if self.mode == "api_only" and not self.fallback_model:
            raise ValueError("fallback_model: mode api_only needs --fallback-model")
        if self.fallback_key_env and self.fallback_key_file:
            raise ValueError(
                "fallback_key_file: give the key by --fallback-key-env or file, not both"
            )
        if self.fallback_key_file and not self.fallback_key_file.is_file():
            raise ValueError(f"fallback_key_file: {self.fallback_key_file} does not exist")
        return self

    def fallback_key(self) -> SecretStr | None:
        """The API key, read now from the environment or the secret file; never stored."""
        if self.fallback_key_env:
            value = os.environ.get(self.fallback_key_env)
            if not value:
                raise SettingsError(
                    f"fallback_key_env: environment variable {self.fallback_key_env} is not set"
                )
            return SecretStr(value)
        if self.fallback_key_file:
            return SecretStr(self.fallback_key_file.read_text().strip())
        return None

    def local_token(self) -> str | None:
        """The bearer token the router sends to the runtimes, if they need one."""
        if self.local_token_file is not None:
            return self.local_token_file.read_text().strip()
        return os.environ.get(f"{ENV_PREFIX}ROUTER_LOCAL_TOKEN") or None


class ClientSettings(BaseSettings):
    """How the CLI's client commands (predict, generate, info, health) reach a server.

    Variables only (EDGEDISTILL_CLIENT_*), so a container's HEALTHCHECK picks them up too.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX + "CLIENT_", extra="forbid", frozen=True, env_ignore_empty=True
    )
    env_only: ClassVar[bool] = True

    tls_ca: Path | None = Field(None, description="CA (PEM) to verify the server: use TLS")
    tls_cert: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    tls_key: Path | None = Field(None, description="private key of the client certificate")
    token_file: Path | None = Field(
        None, description="file holding the bearer token (or EDGEDISTILL_CLIENT_TOKEN)"
    )

    @model_validator(mode="after")
    def _files_exist(self) -> ClientSettings:
        for name in ("tls_ca", "tls_cert", "tls_key", "token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: a client certificate needs its key (TLS_CERT and TLS_KEY)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return os.environ.get(f"{ENV_PREFIX}CLIENT_TOKEN") or None
