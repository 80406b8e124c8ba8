"""Typed decoding of a Predict answer: the scaffold is forced, each value is decoded by its type.

A ChatAdapter answer is each output field's header and value, then the completed marker (`[[ ##
a ## ]]`, newline, value, blank line, `[[ ## b ## ]]`, ...). Only the values are the model's to
choose. An `OutputPlan` (one per program and model) holds the first header's tokens (appended
to the prompt) and, for each output field, how its value is constrained and the tokens that
follow it (the next header, appended by the engine and evaluated as one prompt piece, never
sampled):

- choice (`Literal`, `bool`): the token sequences of the allowed values' texts, walked as a
  trie; other tokens are masked, a unique continuation is forced without sampling;
- number (`int`, `float`): tokens of number characters that keep the text a number's prefix;
- json (lists, dicts, pydantic models): llama.cpp's JSON-schema grammar;
- text (`str`): free, until the model starts the next header.

An optional type (`int | None`, `Optional[Literal[...]]`) is its type's plan that also allows
`None`, the text ChatAdapter writes for None and DSPy's parser reads back as None.

A `PlanCursor` walks one answer through its plan: the engine asks it which tokens are allowed
(or which grammar applies), samples, and hands the token back; the cursor says what text to
show, which tokens to force next, and when the answer is complete. Pure: no llama.cpp here.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np

from services.core.program import (
    COMPLETED_MARKER,
    PromptCodec,
    SchemaValue,
    choice_values,
    is_code,
    optional_inner,
)

ValueKind = Literal["choice", "number", "json", "text"]
# A free value ends where the model starts a header: a blank line, then `[[`.
HEADER_START = "\n\n[["
# DSPy's parser also reads a header on a line of its own after a single newline, or right after
# the field's own header (an empty value): a line starting `[[ ##` ends a free value too.
HEADER_LINE = "\n[[ ##"
_NUMBER_CHARS = frozenset("0123456789-+.eE")
_NONE = "None"  # ChatAdapter's text of None
_PREFIX = {"int": re.compile(r"-?\d*"), "float": re.compile(r"-?(\d+(\.\d*)?([eE][-+]?\d*)?)?")}
_FULL = {"int": re.compile(r"-?\d+"), "float": re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")}


class TextTokenizer(Protocol):
    """A model's tokenizer turning text into tokens, without special tokens or BOS."""

    def tokenize_text(self, text: str) -> list[int]: ...


class Tokenizer(TextTokenizer, Protocol):
    """What a plan needs from the model: its tokenizer, without special tokens or BOS."""

    def token_bytes(self, token: int) -> bytes: ...

    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True)
class FieldPlan:
    name: str
    kind: ValueKind
    after_text: str  # what follows the value: the next header, or the completed marker
    after: tuple[int, ...]  # its tokens; after[0] is what a typed value ends by sampling
    break_len: int  # a free value ends when its tokens end with after[:break_len]
    last: bool
    choices: tuple[tuple[int, ...], ...] = ()
    choice_texts: tuple[str, ...] = ()
    number: str = ""  # "int" or "float"
    json_schema: str = ""
    nullable: bool = False  # `None` is a value too (an optional type)
    # after[:line_len] spells "\n" + HEADER_LINE: a free value whose text (after its header's
    # newline) ends a line then starts `[[ ##` ends there, after[line_len:] forced (0: none)
    line_len: int = 0
    # A JSON value whose schema is chosen by an earlier choice field's value (ReAct's
    # arguments by its tool): that field's name, and (value, schema) pairs
    schema_by: str = ""
    schema_for: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class OutputPlan:
    header_text: str  # the first field's header, appended to the prompt
    header: tuple[int, ...]
    fields: tuple[FieldPlan, ...]
    number_tokens: tuple[tuple[int, str], ...] = ()  # vocabulary entries made of number chars
    none_tokens: tuple[tuple[int, str], ...] = ()  # entries that are pieces of `None`


def build_plan(codec: PromptCodec, tokenizer: Tokenizer) -> OutputPlan:
    """The plan of a program's answers on one model."""
    names = codec.output_names
    fields = []
    for index, name in enumerate(names):
        last = index == len(names) - 1
        after_text = "\n\n" + (COMPLETED_MARKER if last else header(names[index + 1]))
        after = tokens_after(tokenizer, "x", after_text)
        info = codec.signature.output_fields[name]
        breaks = _spelled_by(after, tokenizer, HEADER_START, prefix=True) or len(after)
        plan = _field_plan(name, info, after_text, after, last, tokenizer, breaks)
        line_len = _spelled_by(after, tokenizer, "\n" + HEADER_LINE, prefix=False)
        by, schemas = codec.value_schemas.get(name, ("", {}))
        if plan.kind == "json" and by in names[:index]:
            plan = replace(plan, schema_by=by, schema_for=tuple(sorted(schemas.items())))
        fields.append(replace(plan, line_len=line_len))
    numbers = any(f.kind == "number" for f in fields)
    nullable_numbers = any(f.kind == "number" and f.nullable for f in fields)
    first = header(names[0])
    return OutputPlan(
        header_text=first,
        header=tuple(tokenizer.tokenize_text(first)),
        fields=tuple(fields),
        number_tokens=_vocabulary(tokenizer, lambda s: set(s) <= _NUMBER_CHARS) if numbers else (),
        none_tokens=_vocabulary(tokenizer, lambda s: s in _NONE) if nullable_numbers else (),
    )


def tokens_after(tokenizer: TextTokenizer, context: str, text: str) -> tuple[int, ...]:
    """The tokens of `text` as the model sees it after `context` (a tokenizer that adds a
    leading space, or merges across the boundary, tokenizes it differently on its own)."""
    before = tokenizer.tokenize_text(context)
    joined = tokenizer.tokenize_text(context + text)
    if joined[: len(before)] == before:
        return tuple(joined[len(before) :])
    return tuple(tokenizer.tokenize_text(text))


def header(name: str) -> str:
    return f"[[ ## {name} ## ]]\n"


def _spelled_by(after: tuple[int, ...], tokenizer: Tokenizer, text: str, prefix: bool) -> int:
    """The fewest of `after`'s first tokens whose text starts with `text` (is `text`, unless
    `prefix`); 0 when none do."""
    for size in range(1, len(after) + 1):
        found = b"".join(tokenizer.token_bytes(t) for t in after[:size]).decode("utf-8", "replace")
        if found.startswith(text) and (prefix or found == text):
            return size
    return 0


def _field_plan(name: str, info: Any, after_text: str, after: tuple[int, ...], last: bool,
                tokenizer: Tokenizer, break_len: int) -> FieldPlan:  # fmt: skip
    value = value_type(info)
    plan = FieldPlan(name, value.kind, after_text, after, break_len, last,
                     number=value.number, json_schema=value.json_schema,
                     nullable=value.nullable)  # fmt: skip
    if value.kind != "choice":
        return plan
    tokens = tuple(tokens_after(tokenizer, header(name), text) for text in value.choice_texts)
    return replace(plan, choices=tokens, choice_texts=value.choice_texts)


@dataclass(frozen=True)
class ValueType:
    """How an output field's value is decoded: one of fixed texts (`choice_texts`, `None`'s
    among them when nullable), a number, JSON of a schema, or free text."""

    kind: ValueKind
    nullable: bool = False
    choice_texts: tuple[str, ...] = ()
    number: str = ""  # "int" or "float"
    json_schema: str = ""


def value_type(info: Any) -> ValueType:
    """An output field's value type, from its annotation (DSPy's field info)."""
    annotation, nullable = optional_inner(info.annotation)
    texts = choice_texts(info, annotation)
    if texts is not None:
        return _choice(texts, nullable)
    if annotation in (int, float):
        return ValueType("number", nullable, number=annotation.__name__)
    stored = json_schema_of(annotation)
    if stored is None:
        return ValueType("text")
    # A type stored as its schema (a model, an Enum) that may be None: `None`, as trained on
    schema, nullable = without_null(json.loads(stored), nullable)
    texts = enum_texts(schema)
    if texts is not None:  # an Enum is written as its value, not as a JSON string
        return _choice(texts, nullable)
    return ValueType("json", nullable, json_schema=json.dumps(schema))


def _choice(texts: tuple[str, ...], nullable: bool) -> ValueType:
    return ValueType("choice", nullable, texts + ((_NONE,) if nullable else ()))


def without_null(schema: dict[str, Any], nullable: bool) -> tuple[dict[str, Any], bool]:
    """A schema `anyOf: [X, null]` as X (its `$defs` kept) and nullable."""
    members = schema.get("anyOf")
    if not isinstance(members, list) or {"type": "null"} not in members:
        return schema, nullable
    rest = [member for member in members if member != {"type": "null"}]
    outer = {key: value for key, value in schema.items() if key != "anyOf"}
    return (outer | rest[0] if len(rest) == 1 else outer | {"anyOf": rest}), True


def enum_texts(schema: dict[str, Any]) -> tuple[str, ...] | None:
    values = schema.get("enum")
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return tuple(values)
    return None


def choice_texts(info: Any, annotation: Any) -> tuple[str, ...] | None:
    """The texts a Literal, Enum or bool field may take, as ChatAdapter writes them."""
    from dspy.adapters.utils import format_field_value

    values = choice_values(annotation)
    if values is None:
        return None
    return tuple(str(format_field_value(field_info=info, value=v)) for v in values)


def json_schema_of(annotation: Any) -> str | None:
    """The JSON Schema of a list, dict, tuple, pydantic-model or stored-schema annotation,
    else None."""
    from typing import get_origin

    import pydantic

    if is_code(annotation):  # written as the code itself
        return None
    origin = get_origin(annotation) or annotation
    structured = (pydantic.BaseModel, SchemaValue)
    is_model = isinstance(annotation, type) and issubclass(annotation, structured)
    if not is_model and origin not in (list, dict, tuple):
        return None
    return json.dumps(pydantic.TypeAdapter(annotation).json_schema())


def _vocabulary(tokenizer: Tokenizer, keep: Callable[[str], bool]) -> tuple[tuple[int, str], ...]:
    """The vocabulary entries whose (non-empty) text `keep` accepts."""
    found = []
    for token in range(tokenizer.vocab_size):
        try:
            text = tokenizer.token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and keep(text):
            found.append((token, text))
    return tuple(found)


def json_value_grammar(gbnf: str, terminator: str, nullable: bool = False) -> str:
    """A JSON-schema grammar (GBNF with a `root` rule) whose root is followed by `terminator`:
    the value's end is the model's to choose, and is then the token that starts what follows.
    Nullable: `None` may stand for the value."""
    renamed = re.sub(r"^root ::=", "json-value ::=", gbnf, count=1, flags=re.MULTILINE)
    value = f"(json-value | {json.dumps(_NONE)})" if nullable else "json-value"
    return f"{renamed}\nroot ::= {value} {json.dumps(terminator)}\n"


@dataclass(frozen=True)
class Step:
    """What accepting a sampled token means: text to show, tokens to force, completion."""

    text: str
    forced: tuple[int, ...] = ()
    done: bool = False


@dataclass
class _Value:
    """The value being decoded."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    choice_logprob: float = 0.0


class PlanCursor:
    """One answer's walk through its plan."""

    def __init__(self, plan: OutputPlan, token_bytes: Callable[[int], bytes]) -> None:
        self.plan = plan
        self._token_bytes = token_bytes
        self._index = 0
        self._value = _Value()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.confidences: dict[str, float] = {}
        self._chosen: dict[str, str] = {}  # choice fields' values so far
        self.done = False

    @property
    def field(self) -> FieldPlan:
        return self.plan.fields[self._index]

    def allowed(self) -> list[int] | None:
        """The tokens the value may continue with; None when any may (text, or a grammar)."""
        plan = self.field
        if plan.kind == "choice":
            return self._choice_next()
        if plan.kind == "number":
            text = self._value.text
            pattern = _PREFIX[plan.number]
            allowed = [t for t, s in self.plan.number_tokens if pattern.fullmatch(text + s)]
            if plan.nullable:
                allowed += [t for t, s in self.plan.none_tokens if _NONE.startswith(text + s)]
            if self._complete():
                allowed.append(plan.after[0])
            return allowed
        return None

    def grammar(self) -> tuple[str, bool] | None:
        """The JSON schema constraining the current value, and whether `None` may stand for
        it, when it has one."""
        plan = self.field
        schema = plan.json_schema
        if plan.schema_by in self._chosen:
            schema = dict(plan.schema_for).get(self._chosen[plan.schema_by], schema)
        return (schema, plan.nullable) if schema else None

    def _choice_next(self) -> list[int]:
        prefix = self._value.tokens
        size = len(prefix)
        matching = [c for c in self.field.choices if list(c[:size]) == prefix]
        allowed = {c[size] for c in matching if len(c) > size}
        if any(len(c) == size for c in matching):
            allowed.add(self.field.after[0])  # a complete value that a longer one extends
        return sorted(allowed)

    def accept(self, token: int, logprob: float, constrained_logprob: float, eog: bool) -> Step:
        """Take the sampled token. `logprob` is the model's, `constrained_logprob` the token's
        among the allowed ones (the same for unconstrained values)."""
        plan, value = self.field, self._value
        if eog:
            return self._end(plan.after)
        if plan.kind != "text" and token == plan.after[0] and self._complete():
            return self._end(plan.after[1:], shown=plan.after_text)
        value.tokens.append(token)
        piece = self._decoder.decode(self._token_bytes(token))
        value.text += piece
        value.logprobs.append(logprob)
        value.choice_logprob += constrained_logprob
        if plan.kind == "choice":
            return self._after_choice_token(piece)
        if plan.kind == "text":
            return self._after_text_token(piece)
        return Step(piece)

    def _complete(self) -> bool:
        plan, text = self.field, self._value.text
        if plan.nullable and text == _NONE:
            return True
        if plan.kind == "number":
            return bool(_FULL[plan.number].fullmatch(text))
        if plan.kind == "json":
            try:
                json.loads(text)
            except ValueError:
                return False
        return True

    def _after_choice_token(self, piece: str) -> Step:
        prefix = self._value.tokens
        matching = [i for i, c in enumerate(self.field.choices) if list(c[: len(prefix)]) == prefix]
        if len(matching) != 1:
            return Step(piece)
        # One value left: its remaining tokens are forced, not sampled.
        chosen = matching[0]
        rest = self.field.choices[chosen][len(prefix) :]
        rest_text = self.field.choice_texts[chosen][len(self._value.text) :]
        self._value.text += rest_text
        end = self._end(self.field.after)
        forced = () if end.done else rest + end.forced
        return Step(piece + rest_text + end.text, forced, end.done)

    def _after_text_token(self, piece: str) -> Step:
        plan, value = self.field, self._value
        cut = plan.after[: plan.break_len]
        if len(value.tokens) >= len(cut) and tuple(value.tokens[-len(cut) :]) == cut:
            shown = b"".join(self._token_bytes(t) for t in cut).decode("utf-8", "replace")
            del value.tokens[-len(cut) :], value.logprobs[-len(cut) :]
            value.text = value.text.removesuffix(shown)
            return self._header_begun(piece, plan.break_len, len(shown))
        if plan.line_len and ("\n" + value.text).endswith(HEADER_LINE):
            self._drop_text(len(HEADER_LINE) - 1)
            return self._header_begun(piece, plan.line_len, len(HEADER_LINE) + 1)
        if COMPLETED_MARKER in value.text:  # the model ended the answer its own way
            self.done = True
            return Step(piece, done=True)
        return Step(piece)

    def _header_begun(self, piece: str, written_tokens: int, written_chars: int) -> Step:
        """The model began the next header (as the first tokens and characters of `after`, up
        to this piece): the value is complete and the rest of the header is forced."""
        plan = self.field
        end = self._end(plan.after[written_tokens:], shown=plan.after_text[written_chars:])
        return Step(piece + end.text, end.forced, end.done)

    def _drop_text(self, length: int) -> None:
        """Take the value's last `length` characters (the header the model began) and the
        blank lines before them out of its text, with the tokens that spell only them."""
        value = self._value
        kept = value.text[: len(value.text) - length].rstrip("\n")
        extra = len(value.text[len(kept) :].encode())
        while value.tokens and len(self._token_bytes(value.tokens[-1])) <= extra:
            extra -= len(self._token_bytes(value.tokens.pop()))
            value.logprobs.pop()
        value.text = kept

    def _end(self, forced: tuple[int, ...], shown: str | None = None) -> Step:
        """The value is complete: record its confidence, move to the next field."""
        plan, value = self.field, self._value
        if plan.kind == "choice":
            confidence = math.exp(value.choice_logprob)
        elif value.logprobs:
            confidence = math.exp(sum(value.logprobs) / len(value.logprobs))
        else:
            confidence = 1.0
        self.confidences[plan.name] = max(0.0, min(1.0, confidence))
        if plan.kind == "choice":
            self._chosen[plan.name] = value.text
        text = plan.after_text if shown is None else shown
        if plan.last:
            self.done = True
            return Step(text, (), True)
        self._index += 1
        self._value = _Value()
        # a forced value's sampled part may have ended inside a character: its bytes are done
        self._decoder.reset()
        return Step(text, forced)


def constrain_logits(logits: np.ndarray, allowed: list[int] | None) -> tuple[float, float]:
    """Mask `logits` in place to the allowed tokens; returns the log-normalisers over all
    tokens and over the allowed ones (computed before masking)."""
    peak = float(logits.max())
    total = peak + float(np.log(np.exp(logits - peak).sum()))
    if allowed is None:
        return total, total
    index = np.asarray(allowed, dtype=np.intp)
    kept = logits[index].copy()
    local_peak = float(kept.max())
    allowed_total = local_peak + float(np.log(np.exp(kept - local_peak).sum()))
    logits[:] = -np.inf
    logits[index] = kept
    return total, allowed_total
