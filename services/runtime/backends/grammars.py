"""llama.cpp grammars: a call's GBNF or JSON Schema, each typed value's, and the parse check.

llama.cpp parses a grammar when its sampler is made and answers a grammar it cannot parse
with no sampler (a chain given none crashes), giving its reason on the process's stderr (a
syntax error) or to its log (no root rule, left recursion). `check_parses` makes that sampler
once, for the call's validation, and turns the reason into the error's message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from services.core.sampling import GenerationParams
from services.core.validation import json_schema_object
from services.runtime.backends.llama_log import llama_log_captured
from services.runtime.structured import json_value_grammar

# What llama.cpp prints when it refuses a grammar; the line gives the error's message.
_PARSER_REASONS = ("error parsing grammar: ", "grammar does not contain", "left recursion",
                   "invalid grammar: ")  # fmt: skip
_STDERR_LOCK = threading.Lock()


def output_grammar(params: GenerationParams) -> Any:
    """The grammar a Generate's output follows: its GBNF, its JSON Schema's, or None."""
    if params.grammar:
        return gbnf_grammar(params.grammar)
    if params.json_schema:
        return grammar_for(params.json_schema)
    return None


@lru_cache(maxsize=64)
def gbnf_grammar(gbnf: str) -> Any:
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(gbnf, verbose=False)


@lru_cache(maxsize=64)
def grammar_for(schema: str) -> Any:
    """A llama.cpp grammar from a JSON Schema; ValueError when the schema is unusable."""
    from llama_cpp import LlamaGrammar

    parsed = json_schema_object(schema)
    try:
        return LlamaGrammar.from_json_schema(json.dumps(parsed), verbose=False)
    except Exception as err:
        raise ValueError(f"cannot turn this JSON Schema into a grammar ({err})") from err


@lru_cache(maxsize=64)
def value_grammar(schema: str, nullable: bool, terminator: str) -> Any:
    """A JSON value of `schema` (or `None`, nullable), then `terminator` (what follows the
    value in the answer)."""
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf = json_value_grammar(json_schema_to_gbnf(schema), terminator, nullable)
    return LlamaGrammar.from_string(gbnf, verbose=False)


def check_parses(vocab: Any, grammar: Any) -> None:
    """ValueError with llama.cpp's reason when it cannot parse the grammar for this vocabulary
    (a rule it cannot read, an undefined rule, no `root`, left recursion)."""
    import llama_cpp

    with (
        _STDERR_LOCK,
        llama_log_captured(forward=True) as logged,
        _captured_stderr(grammar._grammar) as printed,
    ):
        sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
        return
    said = printed + logged
    reasons = [line.strip() for line in said if any(r in line for r in _PARSER_REASONS)]
    reason = reasons[0].split("error parsing grammar: ")[-1] if reasons else "no reason given"
    raise ValueError(f"llama.cpp cannot parse it: {reason}")


@contextmanager
def _captured_stderr(source: str) -> Iterator[list[str]]:
    """The lines written to the process's stderr (file descriptor 2, where llama.cpp's parser
    prints) while inside; what is not llama.cpp's report on the grammar `source` is written on
    afterwards, so another thread's log line that came meanwhile is not lost."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())
    echoed = {line.strip() for line in source.splitlines()}
    others = [line for line in lines if line.strip() and line.strip() not in echoed
              and not any(reason in line for reason in _PARSER_REASONS)]  # fmt: skip
    if others:
        sys.stderr.write("\n".join(others) + "\n")
