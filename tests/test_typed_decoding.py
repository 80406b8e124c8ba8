"""Typed decoding (services/runtime/structured.py): the scaffold is forced, values are decoded by
their types; typed outputs on the wire; the prefix-first prompt format.

The cursor's rules are tested on a small stand-in tokenizer; the rest on the real SmolLM2 GGUF,
real runtimes and routers on loopback."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.api import pb
from services.core.client import InferenceClient
from services.core.program import ProgramSpec, PromptCodec
from services.runtime.structured import OutputPlan, PlanCursor, build_plan, constrain_logits
from testkit.bundles import CAPITALS_PROGRAM, make_bundle
from testkit.openai_standin import OpenAIStandIn
from testkit.processes import ServerProcess, start_router, start_runtime
from testkit.structured import Line, Size

CATEGORIES = ["billing", "technical", "account", "shipping"]
TRIAGE = {
    "name": "triage",
    "instructions": "Classify the support ticket.",
    "inputs": [{"name": "ticket", "type": "str"}],
    "outputs": [
        {"name": "category", "type": f"Literal{CATEGORIES!r}"},
        {"name": "urgent", "type": "bool"},
    ],
    "demos": [
        {"ticket": "I was charged twice this month", "category": "billing", "urgent": True},
        {"ticket": "My package never arrived", "category": "shipping", "urgent": False},
        {"ticket": "The app crashes on start", "category": "technical", "urgent": True},
    ],
}
TICKETS = [
    "I cannot log in to my account", "The app crashes when I upload a photo",
    "Where is my refund?", "My order is late", "Password reset link broken",
    "Invoice shows wrong amount", "Screen freezes", "Box arrived damaged",
]  # fmt: skip
COUNTRIES = ["Germany", "Italy", "Spain", "Canada", "Egypt", "Peru", "Kenya", "Norway"]
# Every typed output the plan knows, for sampling and JSON checks (and free text after them).
TYPED_OUTPUTS = [
    {"name": "category", "type": f"Literal{CATEGORIES!r}"},
    {"name": "urgent", "type": "bool"},
    {"name": "priority", "type": "int"},
    {"name": "tags", "type": "list[str]"},
]
TYPED_DEMOS = [
    {"ticket": "I was charged twice this month", "category": "billing", "urgent": True,
     "priority": 2, "tags": ["charge", "refund"]},
    {"ticket": "My package never arrived", "category": "shipping", "urgent": False,
     "priority": 3, "tags": ["delivery"]},
]  # fmt: skip
ONLY_TYPED = {**TRIAGE, "outputs": TYPED_OUTPUTS, "demos": TYPED_DEMOS}
EVERY_TYPE = {
    **TRIAGE,
    "outputs": [*TYPED_OUTPUTS, {"name": "summary", "type": "str"}],
    "demos": [{**TYPED_DEMOS[0], "summary": "Double charge."},
              {**TYPED_DEMOS[1], "summary": "Lost package."}],
}  # fmt: skip


# -- the cursor, on a stand-in tokenizer -------------------------------------------------------


class PieceTokenizer:
    """Greedy longest match over a small vocabulary of byte pieces (a stand-in: the rules, not
    a model); `vocab` is each piece as text."""

    def __init__(self, extra: list[str]) -> None:
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self._use([p.encode() for p in ["\n\n", "[[", " ##", " ]]", *extra, *chars]])

    def _use(self, pieces: list[bytes]) -> None:
        self.pieces = list(dict.fromkeys(pieces))
        self.vocab = [piece.decode("latin-1") for piece in self.pieces]

    def tokenize_text(self, text: str) -> list[int]:
        data, tokens, at = text.encode(), [], 0
        while at < len(data):
            best = max((v for v in self.pieces if data.startswith(v, at)), key=len)
            tokens.append(self.pieces.index(best))
            at += len(best)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)


def plan_for(outputs: list[dict[str, str]], extra: list[str]) -> tuple[OutputPlan, PieceTokenizer]:
    spec = ProgramSpec.model_validate(
        {"instructions": "x", "inputs": [{"name": "q"}], "outputs": outputs}
    )
    tokenizer = PieceTokenizer(extra)
    return build_plan(PromptCodec(spec), tokenizer), tokenizer


def walk(plan: OutputPlan, tokenizer: PieceTokenizer, texts: list[str]) -> tuple[str, PlanCursor]:
    """Feed sampled tokens (given as texts), checking each is allowed; the answer's text."""
    cursor = PlanCursor(plan, tokenizer.token_bytes)
    shown = plan.header_text
    for text in texts:
        token = tokenizer.vocab.index(text)
        allowed = cursor.allowed()
        assert allowed is None or token in allowed, (text, [tokenizer.vocab[t] for t in allowed])
        step = cursor.accept(token, math.log(0.5), math.log(0.8), eog=False)
        shown += step.text
        assert tuple(step.forced) == () or not step.done
    return shown, cursor


def test_a_choice_is_masked_to_its_values_and_a_unique_rest_is_forced() -> None:
    plan, tok = plan_for(
        [{"name": "size", "type": "Literal['small', 'smaller', 'large']"}],
        ["sm", "all", "er", "lar", "ge"],
    )
    cursor = PlanCursor(plan, tok.token_bytes)
    assert sorted(tok.vocab[t] for t in cursor.allowed() or []) == ["lar", "sm"]
    step = cursor.accept(tok.vocab.index("lar"), -1.0, math.log(0.9), eog=False)
    # "large" is the only value left: "ge" is not sampled, and the answer is complete
    assert step.done and step.text == "large\n\n[[ ## completed ## ]]" and step.forced == ()
    assert cursor.confidences == {"size": pytest.approx(0.9)}

    cursor = PlanCursor(plan, tok.token_bytes)
    cursor.accept(tok.vocab.index("sm"), -1.0, math.log(0.9), eog=False)
    cursor.accept(tok.vocab.index("all"), -1.0, math.log(0.5), eog=False)
    # "small" is complete but "smaller" extends it: the value's end is a choice too
    assert sorted(tok.vocab[t] for t in cursor.allowed() or []) == ["\n\n", "er"]
    step = cursor.accept(tok.vocab.index("\n\n"), -1.0, math.log(0.5), eog=False)
    assert step.done and cursor.confidences["size"] == pytest.approx(0.9 * 0.5)


def test_scaffold_between_fields_is_forced_as_tokens_not_sampled() -> None:
    plan, tok = plan_for(
        [{"name": "ok", "type": "bool"}, {"name": "n", "type": "int"}, {"name": "why"}], []
    )
    cursor = PlanCursor(plan, tok.token_bytes)
    step = cursor.accept(tok.vocab.index("T"), -0.1, -0.1, eog=False)  # True is the only T...
    assert step.text == "True\n\n[[ ## n ## ]]\n" and not step.done
    assert step.forced == tuple(tok.tokenize_text("rue")) + plan.fields[0].after
    # int: digits and a leading minus only; the end only once a number is complete
    allowed = {tok.vocab[t] for t in cursor.allowed() or []}
    assert "-" in allowed and "7" in allowed and "a" not in allowed and "\n\n" not in allowed
    cursor.accept(tok.vocab.index("4"), -0.1, -0.1, eog=False)
    assert "\n\n" in {tok.vocab[t] for t in cursor.allowed() or []}
    step = cursor.accept(tok.vocab.index("\n\n"), -0.1, -0.1, eog=False)
    assert step.text == "\n\n[[ ## why ## ]]\n"  # the blank line was sampled, the rest forced
    assert step.forced == plan.fields[1].after[1:]
    # free text until the model starts a header: then the rest of it is the answer's end
    shown, done = "", False
    for text in ["b", "e", "c", "a", "u", "s", "e", "\n\n", "["]:
        step = cursor.accept(tok.vocab.index(text), -0.2, -0.2, eog=False)
        shown, done = shown + step.text, step.done
    assert not done  # a lone bracket is text; the header starts with the `[[` token
    shown += cursor.accept(tok.vocab.index("\n\n"), -0.2, -0.2, eog=False).text
    step = cursor.accept(tok.vocab.index("[["), -0.2, -0.2, eog=False)
    assert step.done and (shown + step.text).endswith("because\n\n[\n\n[[ ## completed ## ]]")
    assert cursor.confidences["why"] == pytest.approx(math.exp(-0.2))


def test_a_free_value_ends_at_a_line_dspy_reads_as_a_header() -> None:
    """DSPy reads a line starting `[[ ## name ## ]]` as a header after one newline too, and
    right after the field's own header (an empty value, as a model writes for an empty
    input): the value ends there and the rest of the header is forced, so the answer parses."""
    outputs = [{"name": "note"}, {"name": "n", "type": "int"}]
    plan, tok = plan_for(outputs, [])
    codec = PromptCodec(ProgramSpec.model_validate({"instructions": "x", "inputs": [{"name": "q"}],
                                                    "outputs": outputs}))  # fmt: skip
    for texts, value in ((["\n", "[[", " ##"], ""), (["[[", " ##"], ""),
                         (["o", "k", "\n", "[[", " ##"], "ok")):  # fmt: skip
        cursor = PlanCursor(plan, tok.token_bytes)
        shown = plan.header_text
        for text in texts:
            logprob = -0.2 if text in "ok" else -3.0  # a header's tokens are not the value's
            step = cursor.accept(tok.vocab.index(text), logprob, logprob, eog=False)
            shown += step.text
        assert step.forced == plan.fields[0].after[3:] and cursor.field.name == "n"
        assert shown == "[[ ## note ## ]]\n" + "".join(texts) + " n ## ]]\n"
        assert cursor.confidences["note"] == pytest.approx(math.exp(-0.2) if value else 1.0)
        answer = codec.parse(shown + "3\n\n[[ ## completed ## ]]")
        assert answer is not None and answer.outputs == {"note": value, "n": "3"}
    # a line starting `[[` that is no header stays in the value (a nested list, a wiki link)
    _, cursor = walk(plan, tok, ["[[", "1", "]", "]", "\n", "[[", "x"])
    assert cursor.field.name == "note" and not cursor.done


def test_a_json_value_ends_only_where_it_parses() -> None:
    plan, tok = plan_for([{"name": "tags", "type": "list[str]"}, {"name": "x"}], [])
    cursor = PlanCursor(plan, tok.token_bytes)
    schema = json.loads((cursor.grammar() or ("null", False))[0])
    assert schema == {"items": {"type": "string"}, "type": "array"}
    for text in ["[", '"', "a", '"']:
        cursor.accept(tok.vocab.index(text), -0.1, -0.1, eog=False)
    step = cursor.accept(tok.vocab.index("\n\n"), -0.1, -0.1, eog=False)
    assert step.text == "\n\n" and cursor.grammar() is not None  # not ended: no valid JSON
    cursor = PlanCursor(plan, tok.token_bytes)
    for text in ["[", '"', "a", '"', "]"]:
        cursor.accept(tok.vocab.index(text), -0.1, -0.1, eog=False)
    step = cursor.accept(tok.vocab.index("\n\n"), -0.1, -0.1, eog=False)
    assert step.text == "\n\n[[ ## x ## ]]\n" and cursor.grammar() is None


def test_an_optional_type_allows_none_as_chatadapter_writes_it() -> None:
    """`int | None`, `Optional[bool]`, `Optional[list[str]]`: the type's own plan, plus `None`
    (ChatAdapter's text of None, which DSPy's parser reads as None), and nothing else."""
    from services.runtime.structured import json_value_grammar

    outputs = [{"name": "age", "type": "Union[int, NoneType]"},
               {"name": "ok", "type": "Union[bool, NoneType]"},
               {"name": "tags", "type": "Union[list[str], NoneType]"}]  # fmt: skip
    plan, tok = plan_for(outputs, [])
    shown, cursor = walk(plan, tok, ["N", "o", "n", "e", "\n\n", "N", "N", "o", "n", "e"])
    assert shown.startswith("[[ ## age ## ]]\nNone\n\n[[ ## ok ## ]]\nNone\n\n[[ ## tags")
    assert cursor.grammar() is not None and cursor.grammar()[1]  # type: ignore[index]
    step = cursor.accept(tok.vocab.index("\n\n"), -0.1, -0.1, eog=False)
    assert step.done and step.text == "\n\n[[ ## completed ## ]]"

    cursor = PlanCursor(plan, tok.token_bytes)
    cursor.accept(tok.vocab.index("N"), -0.1, -0.1, eog=False)
    assert {tok.vocab[t] for t in cursor.allowed() or []} == {"o"}  # no digit after N
    cursor = PlanCursor(plan, tok.token_bytes)
    cursor.accept(tok.vocab.index("4"), -0.1, -0.1, eog=False)
    assert "N" not in {tok.vocab[t] for t in cursor.allowed() or []}
    assert plan.fields[1].choice_texts == ("True", "False", "None")
    assert '(json-value | "None")' in json_value_grammar('root ::= "[]"', "\n\n", True)
    plain, _ = plan_for([{"name": "age", "type": "int"}], [])
    assert "N" not in {tok.vocab[t] for t in PlanCursor(plain, tok.token_bytes).allowed() or []}


def test_masking_renormalises_over_the_allowed_tokens() -> None:
    import numpy as np

    logits = np.log(np.array([0.5, 0.3, 0.1, 0.1], dtype=np.float32))
    total, allowed_total = constrain_logits(logits, [1, 2])
    assert math.exp(logits[1] - allowed_total) == pytest.approx(0.75, rel=1e-5)
    assert math.exp(logits[1] - total) == pytest.approx(0.3, rel=1e-5)
    assert np.isneginf(logits[0]) and np.isneginf(logits[3])


# -- on the real model -------------------------------------------------------------------------


class ByteTokenizer(PieceTokenizer):
    """Byte-level pieces, as a BPE vocabulary has: one token may hold part of a character."""

    def __init__(self, extra: list[bytes]) -> None:
        singles = [bytes([b]) for b in range(256)]
        self._use([b"\n\n", b"[[", b" ##", b" ]]", *extra, *singles])


def test_a_value_chosen_by_part_of_a_character_leaves_nothing_in_the_next_field() -> None:
    """A label of multi-byte characters decided by a token holding part of one (日 is three
    bytes): the forced rest completes it, and the next field's text starts clean."""
    spec = ProgramSpec.model_validate(
        {
            "instructions": "x",
            "inputs": [{"name": "q"}],
            "outputs": [
                {"name": "idioma", "type": "Literal['español', '日本語']"},
                {"name": "producto"},
            ],
        }
    )
    tok = ByteTokenizer(["日".encode()[:2]])
    plan = build_plan(PromptCodec(spec), tok)
    cursor = PlanCursor(plan, tok.token_bytes)
    shown = cursor.accept(tok.pieces.index("日".encode()[:2]), -0.1, -0.1, eog=False).text
    assert shown == "日本語\n\n[[ ## producto ## ]]\n"
    for piece in ["ラ".encode(), b"\n\n", b"[["]:
        for token in tok.tokenize_text(piece.decode()):
            shown += cursor.accept(token, -0.1, -0.1, eog=False).text
    assert shown == "日本語\n\n[[ ## producto ## ]]\nラ\n\n[[ ## completed ## ]]"


@pytest.fixture(scope="module")
def backend(gguf_path: Path) -> Iterator[Any]:
    from services.runtime.backends.llamacpp import LlamaCppBackend

    engine = LlamaCppBackend(gguf_path, n_ctx=2048, n_threads=2)
    yield engine
    engine.close()


def answer(backend: Any, program: dict[str, Any], inputs: dict[str, str], *, typed: bool,
           temperature: float = 0.0, seed: int = 0, max_tokens: int = 96) -> Any:  # fmt: skip
    from services.runtime.predict import predict_once, predict_params

    codec = PromptCodec(ProgramSpec.model_validate(program))
    params = predict_params(max_tokens, temperature=temperature, seed=seed)
    return predict_once(backend, codec, inputs, params, typed=typed)


def test_typed_greedy_equals_free_greedy_whenever_the_free_answer_was_valid(backend: Any) -> None:
    compared = 0
    for program, field, values in ((TRIAGE, "ticket", TICKETS),
                                   (CAPITALS_PROGRAM, "country", COUNTRIES)):  # fmt: skip
        for value in values:
            free = answer(backend, program, {field: value}, typed=False)
            typed = answer(backend, program, {field: value}, typed=True)
            assert typed.outcome == "parsed"
            if free.outcome == "parsed":
                compared += 1
                assert typed.outputs == free.outputs, value
                assert typed.finished.decode_steps < free.finished.completion_tokens
    assert compared >= 12


def test_a_literal_never_leaves_its_set_and_json_always_parses_at_temperature_1_5(
    backend: Any,
) -> None:
    seen = set()
    for seed in range(16):
        result = answer(backend, ONLY_TYPED, {"ticket": TICKETS[seed % len(TICKETS)]},
                        typed=True, temperature=1.5, seed=seed, max_tokens=160)  # fmt: skip
        assert result.outcome == "parsed", result.raw_text
        values = json.loads(result.outputs_json)
        assert list(values) == ["category", "urgent", "priority", "tags"]
        assert values["category"] in CATEGORIES and isinstance(values["urgent"], bool)
        assert isinstance(values["priority"], int) and isinstance(values["tags"], list)
        assert all(isinstance(tag, str) for tag in values["tags"])
        seen.add(values["category"])
    assert len(seen) >= 2  # it does sample


def lookup_capital(country: str) -> str:
    """The capital city of a country."""
    return {"Peru": "Lima"}.get(country, "unknown")


def add(a: int, b: int, c: int = 0) -> int:
    """The sum of two or three whole numbers."""
    return a + b + c


def test_a_tools_arguments_schema_is_its_parameters_and_agents_are_found_where_they_sit() -> None:
    """Parameters without a default are required, `*args`/`**kwargs` are no arguments (a
    `**kwargs` tool takes other names too); an agent inside a module or a list is found."""
    import dspy
    import jsonschema

    from services.core.pipeline import tool_argument_schemas

    def search(query: str, *more: str, limit: int = 3, **filters: str) -> str:
        """Search."""
        return query

    class Desk(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.agent = dspy.ReAct("question -> answer", tools=[search, lookup_capital])
            self.spares = [dspy.ReAct("question -> answer", tools=[add])]

    found = tool_argument_schemas(Desk())
    assert set(found) == {"agent.react", "spares[0].react"}
    by, schemas = found["agent.react"]["next_tool_args"]
    assert by == "next_tool_name" and set(schemas) == {"search", "lookup_capital", "finish"}
    valid, schema_of = jsonschema.validate, {k: json.loads(v) for k, v in schemas.items()}
    valid({"query": "x", "limit": 2, "site": "docs"}, schema_of["search"])  # **filters
    for wrong in ({"limit": 2}, {"query": "x", "limit": "two"}):
        with pytest.raises(jsonschema.ValidationError):
            valid(wrong, schema_of["search"])
    with pytest.raises(jsonschema.ValidationError):
        valid({"country": "Peru", "city": "Lima"}, schema_of["lookup_capital"])
    with pytest.raises(jsonschema.ValidationError):
        valid({"answer": "Lima"}, schema_of["finish"])


REACT_DEMOS = [  # as an optimizer leaves them: a step of each kind
    {"question": "What is the capital of Japan?", "trajectory": "",
     "next_thought": "Look it up.", "next_tool_name": "lookup_capital",
     "next_tool_args": {"country": "Japan"}},
    {"question": "What is 2 plus 3?", "trajectory": "", "next_thought": "Add them.",
     "next_tool_name": "add", "next_tool_args": {"a": 2, "b": 3}},
]  # fmt: skip


def react_step(seed: int, backend: Any, codec: PromptCodec) -> tuple[str, Any] | None:
    """A sampled step's tool and arguments; None when its free-text thought ran out of tokens."""
    from services.runtime.predict import predict_once, predict_params

    params = predict_params(160, temperature=1.0, seed=seed)
    asked = f"What is {seed} plus 4?" if seed % 2 else f"What is the capital of Peru, plus {seed}?"
    inputs = {"question": asked, "trajectory": ""}
    result = predict_once(backend, codec, inputs, params, typed=True)
    if result.outcome == "truncated":
        return None
    assert result.outcome == "parsed", result.raw_text
    values = json.loads(result.outputs_json)
    return values["next_tool_name"], values["next_tool_args"]


def test_a_react_steps_arguments_are_those_of_the_tool_it_names_when_sampled(
    backend: Any,
) -> None:
    """A ReAct step names a tool, then its arguments are decoded by that tool's parameters
    (names, types, those without a default required; `finish` takes none): every sampled step
    is a call its tool accepts. Without the tools' schemas the same steps are JSON objects
    only, and some are not a call of their tool."""
    import dspy
    import jsonschema

    from services.core.pipeline import tool_argument_schemas

    agent = dspy.ReAct("question -> answer", tools=[lookup_capital, add], max_iters=3)
    schemas = tool_argument_schemas(agent)["react"]["next_tool_args"][1]
    typed = PromptCodec.for_signature(agent.react.signature, REACT_DEMOS, "prefix-first")
    typed.value_schemas = tool_argument_schemas(agent)["react"]
    untyped = PromptCodec.for_signature(agent.react.signature, REACT_DEMOS, "prefix-first")
    named: list[str] = []
    refused_untyped = 0
    for seed in range(8):
        if step := react_step(seed, backend, typed):
            tool, args = step
            jsonschema.validate(args, json.loads(schemas[tool]))
            agent.tools[tool](**args)  # the call runs
            named.append(tool)
        if step := react_step(seed, backend, untyped):
            tool, args = step
            try:
                jsonschema.validate(args, json.loads(schemas[tool]))
            except jsonschema.ValidationError:
                refused_untyped += 1
    assert len(named) >= 6 and len(set(named)) >= 2, named  # it does sample tools
    assert refused_untyped >= 1


def test_models_and_enums_decode_to_their_types_at_temperature_1_5(backend: Any) -> None:
    """A pydantic model, an Enum and a dict, stored in program.json as a schema, a choice and a
    type text, and optional ones (None written `None`, as ChatAdapter writes it): every sampled
    answer parses, and validates as the author's own types."""
    import dspy

    class ParseOrder(dspy.Signature):
        """Extract the order line."""

        message: str = dspy.InputField()
        line: Line = dspy.OutputField()
        size: Size = dspy.OutputField()
        counts: dict[str, int] = dspy.OutputField()
        gift: Line | None = dspy.OutputField()
        box: Size | None = dspy.OutputField()
        floor: int | None = dspy.OutputField()

    program = ProgramSpec.from_signature(ParseOrder, prompt_format="prefix-first").model_dump()
    sizes = set()
    for seed in range(8):
        result = answer(backend, program, {"message": f"{seed + 2} blue mugs, small box"},
                        typed=True, temperature=1.5, seed=seed, max_tokens=240)  # fmt: skip
        assert result.outcome == "parsed", result.raw_text
        values = json.loads(result.outputs_json)
        Line.model_validate(values["line"])
        sizes.add(Size(values["size"]))
        assert all(isinstance(k, str) and type(v) is int for k, v in values["counts"].items())
        assert values["gift"] is None or Line.model_validate(values["gift"])
        assert values["box"] is None or Size(values["box"])
        assert values["floor"] is None or type(values["floor"]) is int
    assert sizes


def test_batched_typed_decoding_equals_one_at_a_time(gguf_path: Path, backend: Any) -> None:
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp
    from services.runtime.predict import predict_params, prepare_answer

    codec = PromptCodec(ProgramSpec.model_validate(EVERY_TYPE))
    params = predict_params(96, seed=0)
    batched = BatchedLlamaCpp(gguf_path, n_ctx=1024, n_threads=2, parallel=3)
    try:
        prompts = {t: prepare_answer(batched, codec, codec.format_messages({"ticket": t}))
                   for t in TICKETS[:3]}  # fmt: skip
        for ticket, prompt in prompts.items():
            batched.start(ticket, prompt, params)
        texts = dict.fromkeys(prompts, "")
        while batched.active:
            for owner, event in batched.step():
                texts[owner] += event.text
    finally:
        batched.close()
    for ticket in prompts:
        alone = answer(backend, EVERY_TYPE, {"ticket": ticket}, typed=True)
        assert texts[ticket] == alone.raw_text


# -- the wire ----------------------------------------------------------------------------------

URGENT = {**TRIAGE, "outputs": [TRIAGE["outputs"][1]]}  # type: ignore[index]


@pytest.fixture(scope="module")
def urgent_bundle(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    root = tmp_path_factory.mktemp("typed") / "bundle"
    return make_bundle(root, gguf_path, {**URGENT, "prompt_format": "prefix-first"}, 0.5)


@pytest.fixture(scope="module")
def urgent_runtime(urgent_bundle: Path) -> Iterator[ServerProcess]:
    server = start_runtime("--bundle", str(urgent_bundle), "--n-ctx", "2048")
    yield server
    server.terminate()


def test_a_bool_arrives_as_a_json_boolean_from_the_runtime(urgent_runtime: ServerProcess) -> None:
    with InferenceClient(urgent_runtime.target, timeout_s=60) as client:
        reply = client.predict({"ticket": "The server room is on fire"})
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
    assert reply.outputs["urgent"] in ("True", "False")  # the text map is unchanged
    assert json.loads(reply.outputs_json) == {"urgent": reply.outputs["urgent"] == "True"}
    assert 0 < reply.usage.decode_steps < reply.usage.completion_tokens


def test_a_bool_arrives_as_a_json_boolean_through_the_router(
    urgent_bundle: Path, urgent_runtime: ServerProcess
) -> None:
    gold = {"The server room is on fire": "True"}
    with OpenAIStandIn(gold, input_field="ticket", output_field="urgent") as api:
        replies = []
        for threshold in ("0.0", "1.01"):  # local, then every call to the API
            router = start_router(urgent_bundle, urgent_runtime.target, "--threshold", threshold,
                                  "--fallback-model", "openai/gold", "--fallback-api-base",
                                  api.base_url)  # fmt: skip
            try:
                with InferenceClient(router.target, timeout_s=60) as client:
                    replies.append(client.predict({"ticket": "The server room is on fire"}))
            finally:
                router.terminate()
    local, fallback = replies
    assert local.served_by == pb.SERVED_BY_LOCAL
    assert isinstance(json.loads(local.outputs_json)["urgent"], bool)
    assert fallback.served_by == pb.SERVED_BY_FALLBACK
    assert fallback.outputs_json == '{"urgent": true}'


def test_the_cli_prints_typed_values(urgent_runtime: ServerProcess) -> None:
    import subprocess
    import sys

    from testkit.processes import REPO

    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "predict", "--target", urgent_runtime.target,
         "-i", "ticket=The server room is on fire", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert isinstance(json.loads(out)["outputs"]["urgent"], bool)


# -- prompt formats ----------------------------------------------------------------------------


def test_prefix_first_puts_every_fixed_part_before_the_inputs() -> None:
    chat = PromptCodec(ProgramSpec.model_validate(TRIAGE))
    first = PromptCodec(ProgramSpec.model_validate({**TRIAGE, "prompt_format": "prefix-first"}))
    old = chat.format_messages({"ticket": "VPN down"})
    new = first.format_messages({"ticket": "VPN down"})
    assert old[:-1] == new[:-1]  # system and demos unchanged
    assert old[-1]["content"].startswith("[[ ## ticket ## ]]\nVPN down\n\nRespond with")
    assert new[-1]["content"].startswith("Respond with")
    assert new[-1]["content"].endswith("[[ ## ticket ## ]]\nVPN down")
    # the training record is the served prompt plus the answer, in both formats
    record = first.format_finetune({"ticket": "VPN down"}, {"category": "technical",
                                                            "urgent": True})  # fmt: skip
    assert record["messages"][:-1] == new


def test_an_old_format_program_still_serves(tmp_path: Path, gguf_path: Path) -> None:
    """A program.json without prompt_format (bundles before it) is served as ChatAdapter."""
    path = tmp_path / "program.json"
    path.write_text(json.dumps(TRIAGE))
    assert ProgramSpec.load(path).prompt_format == "chat"
    server = start_runtime("--model", str(gguf_path), "--program", str(path), "--n-ctx", "2048")
    try:
        with InferenceClient(server.target, timeout_s=60) as client:
            reply = client.predict({"ticket": "Invoice shows wrong amount"})
    finally:
        server.terminate()
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
    assert json.loads(reply.outputs_json)["category"] in CATEGORIES
