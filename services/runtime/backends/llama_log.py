"""llama.cpp's log, captured: where llama.cpp gives the reason it refused something."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def llama_log_captured(forward: bool = False) -> Iterator[list[str]]:
    """llama.cpp's log lines while in the block, kept instead of printed (or, with `forward`,
    also handed to llama-cpp-python's own handler); that handler is restored after."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))
        if forward:
            _logger.llama_log_callback(level, text, user_data)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
