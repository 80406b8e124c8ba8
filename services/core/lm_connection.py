"""How dspy.LM reaches an API model: the teacher's (build) and the router's fallback."""

from __future__ import annotations

from typing import Any

# Keyless local servers still need a key to be given (vLLM's convention; DSPy refuses "").
KEYLESS = "EMPTY"


def connection(model: str, api_base: str | None, api_key: str | None) -> dict[str, Any]:
    """dspy.LM's `api_base` and `api_key` for `model`: the key given, else a placeholder for a
    server of our own (any `api_base`), else none (the provider's variable, e.g.
    OPENAI_API_KEY, as LiteLLM reads it)."""
    found: dict[str, Any] = {}
    if api_base:
        found["api_base"] = api_base_for(model, api_base)
    if api_key is not None:
        found["api_key"] = api_key
    elif api_base:
        found["api_key"] = KEYLESS
    return found


def litellm_connection(model: str, api_base: str | None, api_key: str | None) -> dict[str, Any]:
    """LiteLLM's own `api_base` and `api_key` for `model` (the router's streamed Generate calls
    LiteLLM directly): as `connection`, except that LiteLLM reaches an Ollama server by its
    native API, under the root."""
    found = connection(model, None, api_key)
    if api_base:
        found |= connection(model, api_base, api_key)
        if model.split("/", 1)[0] in ("ollama", "ollama_chat"):
            found["api_base"] = api_base.rstrip("/").removesuffix("/v1")
    return found


def api_base_for(model: str, base: str) -> str:
    """The base URL DSPy's client calls `<base>/chat/completions` under. For an Ollama server
    (`ollama_chat/`, `ollama/`) people give its root, `http://host:11434`, as DSPy's docs show;
    DSPy 3.4's own engine calls it through Ollama's OpenAI-compatible API, which is under
    `/v1`, so the root gets `/v1`."""
    base = base.rstrip("/")
    if model.split("/", 1)[0] in ("ollama", "ollama_chat") and not base.endswith("/v1"):
        return base + "/v1"
    return base
