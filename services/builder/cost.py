"""Cost per 1K calls, API and local: pure functions of measured usage and a price.

The API's price comes from the spec (`cost.api_per_1k_calls`, or per-token prices) or else
LiteLLM's offline price map for the teacher's model; local cost is the host's hourly price over
the measured serial throughput (0 by default: the host is already paid for).
"""

from __future__ import annotations

import os
from typing import Any

from services.builder.spec import CostSpec


def litellm_token_prices(model: str) -> tuple[float, float] | None:
    """(input, output) price per token from LiteLLM's offline map, or None if it has no entry."""
    # Offline whoever calls: without this, importing litellm fetches the map from GitHub.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    for name in (model, model.split("/", 1)[-1]):
        entry = litellm.model_cost.get(name)
        if entry and entry.get("input_cost_per_token") is not None:
            return float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"] or 0)
    return None


def api_cost_per_1k(
    *,
    prompt_tokens_per_call: float,
    completion_tokens_per_call: float,
    cost: CostSpec,
    model: str,
    price_map: Any = litellm_token_prices,
) -> dict[str, Any] | None:
    """The API's cost of 1,000 calls and where its price comes from; None without a price."""
    if cost.api_per_1k_calls is not None:
        return {"per_1k_calls": cost.api_per_1k_calls, "source": "spec cost.api_per_1k_calls"}
    if cost.api_input_per_1m_tokens is not None or cost.api_output_per_1m_tokens is not None:
        per_in = (cost.api_input_per_1m_tokens or 0.0) / 1e6
        per_out = (cost.api_output_per_1m_tokens or 0.0) / 1e6
        source = "spec cost.api_*_per_1m_tokens"
    else:
        prices = price_map(model)
        if prices is None:
            return None
        (per_in, per_out), source = prices, f"LiteLLM price map ({model})"
    per_call = prompt_tokens_per_call * per_in + completion_tokens_per_call * per_out
    return {"per_1k_calls": 1000 * per_call, "source": source}


def local_cost_per_1k(*, mean_latency_s: float, local_per_hour: float) -> float:
    """An hour of the host buys 3600 / latency serial calls."""
    return local_per_hour * 1000 * mean_latency_s / 3600


def hybrid_cost_per_1k(*, api_share: float, api: float | None, local: float) -> float | None:
    """Every call runs locally first; the API's share also pays the API."""
    return None if api is None else local + api_share * api
