"""Model backends: the pluggable transport under the runtime (cf. httpx's transports).

A backend turns a chat (messages + sampling) into a stream of tokens with log-probabilities.
The scheduler calls it from one thread at a time.
"""

from services.core.sampling import GenerationParams
from services.runtime.backends.base import (
    Backend,
    BackendError,
    BackendInfo,
    BatchingBackend,
    Finished,
    HoldsContext,
    KeepsPrefixes,
    PreparedPrompt,
    SlotState,
    TokenPiece,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendInfo",
    "BatchingBackend",
    "Finished",
    "GenerationParams",
    "HoldsContext",
    "KeepsPrefixes",
    "PreparedPrompt",
    "SlotState",
    "TokenPiece",
]
