"""The shared core: program format, prompt codec, bundle verification, stop-string buffer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from services.core.bundle import Bundle, BundleError, Manifest, write_manifest
from services.core.program import (
    FieldSpec,
    ProgramFormatError,
    ProgramSpec,
    PromptCodec,
    program_from_file,
)
from services.runtime.backends.text import StopStringBuffer
from testkit.bundles import CAPITALS_PROGRAM
from testkit.structured import Line, Order, Size


def test_program_round_trips_through_dspy_signature() -> None:
    import dspy

    class Triage(dspy.Signature):
        """Classify the ticket."""

        ticket: str = dspy.InputField(desc="the ticket text")
        category: Literal["network", "billing"] = dspy.OutputField(desc="the queue")

    spec = ProgramSpec.from_signature(Triage, name="triage")
    again = ProgramSpec.model_validate_json(spec.model_dump_json())
    rebuilt = again.to_signature()
    assert list(rebuilt.input_fields) == ["ticket"]
    assert spec.outputs[0].type == "Literal['network', 'billing']"
    codec = PromptCodec(again)
    # Same prompt as DSPy's own ChatAdapter on the original signature.
    assert codec.format_messages({"ticket": "VPN down"}) == dspy.ChatAdapter().format(
        Triage, [], {"ticket": "VPN down"}
    )


def test_a_history_input_is_prompted_as_dspys_conversation_turns() -> None:
    """A dspy.History input (a chat program's conversation so far) survives program.json and
    is prompted as DSPy prompts it, as earlier user and assistant turns, from its JSON or the
    bare list of turns; anything else is refused naming the field's type."""
    import dspy

    fields = {"question": (str, dspy.InputField()), "history": (dspy.History, dspy.InputField()),
              "answer": (str, dspy.OutputField())}  # fmt: skip
    chat = dspy.Signature(fields, "Answer, taking the conversation so far into account.")
    spec = ProgramSpec.model_validate_json(ProgramSpec.from_signature(chat).model_dump_json())
    turns = [{"question": "What is DNS?", "answer": "It maps names to addresses."}]
    theirs = dspy.ChatAdapter().format(
        chat, [], {"question": "And DHCP?", "history": dspy.History(messages=turns)}
    )
    codec = PromptCodec(spec)
    for sent in (json.dumps({"messages": turns}), json.dumps(turns)):
        assert codec.format_messages({"question": "And DHCP?", "history": sent}) == theirs
    assert [m["role"] for m in theirs] == ["system", "user", "assistant", "user"]
    history = spec.inputs[1]
    assert history.type == "History" and history.input_error(json.dumps(turns)) is None
    assert "is not of type History" in (history.input_error("What is DNS?") or "")

    class History(BaseModel):  # a user's own model of that name is not dspy.History
        events: list[str]

    own = dspy.Signature({"history": (History, dspy.InputField()),
                          "answer": (str, dspy.OutputField())}, "Summarise.")  # fmt: skip
    field = ProgramSpec.from_signature(own).inputs[0]
    assert not field.is_history and field.json_schema is not None
    assert field.input_error('{"events": ["login"]}') is None
    from typing import List  # noqa: UP035 - as older programs write it

    written = {"q": (str, dspy.InputField()), "tags": (List[str], dspy.OutputField())}  # noqa: UP006
    older = ProgramSpec.from_signature(dspy.Signature(written))
    assert (older.outputs[0].type, older.outputs[0].json_schema) == ("list[str]", None)


def test_a_field_declared_without_a_description_is_described_as_empty() -> None:
    import dspy

    from services.core.api import pb
    from services.core.model_info import describe_signature

    spec = ProgramSpec.from_signature(dspy.Signature("review -> sentiment"), name="reviews")
    # DSPy's placeholder stays in program.json (the prompt is DSPy's own) ...
    assert spec.inputs[0].description == "${review}"
    described = pb.ProgramSignature()
    describe_signature(described, spec)
    # ... but GetModelInfo says what the author wrote: nothing.
    assert [f.description for f in described.input_fields] == [""]
    assert [f.description for f in described.output_fields] == [""]


def test_forward_gets_an_input_as_a_jsonl_row_holds_it_whatever_it_came_as() -> None:
    from pydantic.fields import FieldInfo

    def value(annotation: Any, given: Any) -> Any:
        return FieldSpec.describe("x", FieldInfo(annotation=annotation)).forward_value(given)

    assert value(int, "3") == 3 and value(int, 3) == 3 and value(float, "2.5") == 2.5
    assert value(bool, "true") is True and value(bool, "False") is False
    assert value(Literal["1", "2"], "1") == "1" and value(Literal[1, 2], "2") == 2
    assert value(Size, "large") == "large"
    assert value(list[str], '["a", "b"]') == ["a", "b"] and value(list[str], ["a"]) == ["a"]
    assert value(dict[str, int], '{"a": 1}') == {"a": 1}
    assert value(str, "3") == "3"


def test_a_typed_input_that_is_not_of_its_type_is_refused_naming_the_field() -> None:
    """Text sent to an `int`, `list[str]`, Literal or model input is read as the codec reads
    it (JSON where it parses); a value of another type is INVALID_ARGUMENT, not a prompt."""
    import dspy

    from services.core.api import pb
    from services.core.validation import RpcFailure, longest_input, predict_inputs

    class Rate(dspy.Signature):
        review: str = dspy.InputField()
        max_stars: int = dspy.InputField()
        keywords: list[str] = dspy.InputField()
        tone: Literal["formal", "casual"] = dspy.InputField()
        order: Order = dspy.InputField()
        stars: int = dspy.OutputField()

    fields = ProgramSpec.from_signature(Rate, name="rate").inputs
    good = {"review": "{not json", "max_stars": "5", "keywords": '["a", "b"]', "tone": "casual",
            "order": '{"lines": [{"item": "mug", "quantity": 2}]}'}  # fmt: skip
    assert predict_inputs(pb.PredictRequest(inputs=good), fields) == good
    for name, bad, said in (
        ("max_stars", "five", "'five' is not of type int"),
        ("max_stars", "4.5", "fractional part"),
        ("keywords", "a, b", "'a, b' is not of type list[str]"),
        ("tone", "angry", "Input should be 'formal' or 'casual'"),
        ("order", '{"lines": 3}', "is not of type Order"),
    ):
        with pytest.raises(RpcFailure, match=re.escape(f"inputs[{name!r}]: ")) as raised:
            predict_inputs(pb.PredictRequest(inputs={**good, name: bad}), fields)
        assert said in raised.value.message, raised.value.message
        # JSON is the fix for a list or a model; a choice's fix is one of its values.
        assert ("send the value as JSON" in raised.value.message) == (name in ("keywords", "order"))
    # A prompt over the context names the input to shorten: the longest.
    assert longest_input({"review": "long " * 50, "tone": "casual"}) == "inputs['review']"
    assert longest_input({}) == "inputs"
    # The same values typed, as JSON clients send them (`inputs_json`), and mixed with text.
    typed = {"max_stars": 5, "keywords": ["a", "b"], "order": json.loads(good["order"])}
    mixed = pb.PredictRequest(inputs={"review": "{not json", "tone": "casual"},
                              inputs_json=json.dumps(typed))  # fmt: skip
    assert {k: json.loads(v) if k in typed else v
            for k, v in predict_inputs(mixed, fields).items()} == {**good, **typed}  # fmt: skip
    for inputs_json, field, said in (
        ('{"review": null}', "inputs['review']", "null is not a str"),  # not the text "null"
        ('{"max_stars": null}', "inputs['max_stars']", "is not of type int"),
        ('{"tone": "casual"}', "inputs['tone']", "in both inputs and inputs_json"),
        ('["five"]', "inputs_json", "send a JSON object"),
        ("{max_stars: 5}", "inputs_json", "not JSON"),
    ):
        sent_as_json = {k for k in good if f'"{k}"' in inputs_json} - {"tone"}  # tone: both
        as_text = {k: v for k, v in good.items() if k not in sent_as_json}
        request = pb.PredictRequest(inputs=as_text, inputs_json=inputs_json)
        with pytest.raises(RpcFailure, match=re.escape(f"{field}: ")) as raised:
            predict_inputs(request, fields)
        assert said in raised.value.message, raised.value.message


class Node(BaseModel):
    children: list[Node] = []


def order_signature() -> Any:
    import dspy

    class ParseOrder(dspy.Signature):
        """Extract the order."""

        message: str = dspy.InputField()
        first: Line = dspy.OutputField()
        order: Order = dspy.OutputField()
        size: Size = dspy.OutputField()
        counts: dict[str, int] = dspy.OutputField()
        gift_note: str | None = dspy.OutputField()

    return ParseOrder


def test_models_enums_dicts_and_optionals_round_trip_through_program_json() -> None:
    import dspy

    signature = order_signature()
    spec = ProgramSpec.from_signature(signature, name="orders", prompt_format="prefix-first")
    again = ProgramSpec.model_validate_json(spec.model_dump_json())
    types = {f.name: f.type for f in again.outputs}
    assert types == {"first": "Line", "order": "Order", "size": "Size",
                     "counts": "dict[str, int]", "gift_note": "Union[str, NoneType]"}  # fmt: skip
    assert again.outputs[2].enum_values == ["small", "large"]
    assert "$ref" not in json.dumps(again.outputs[1].json_schema)  # Line is inlined
    codec = PromptCodec(again)
    # Where no reference was inlined, the prompt is DSPy's own on the original signature.
    simple = ProgramSpec.from_signature(
        signature.delete("order"), prompt_format="chat"
    ).model_dump_json()
    assert PromptCodec(ProgramSpec.model_validate_json(simple)).format_messages(
        {"message": "2 mugs"}
    ) == dspy.ChatAdapter().format(signature.delete("order"), [], {"message": "2 mugs"})
    values = {
        "first": Line(item="mug", quantity=2),
        "order": Order(lines=[Line(item="mug", quantity=2)], note="wrap it"),
        "size": Size.SMALL, "counts": {"mug": 2}, "gift_note": None,
    }  # fmt: skip
    answer = codec.format_assistant(values)
    parsed = codec.parse(answer)
    assert parsed is not None
    # The values DSPy's own parser gives on the original signature, as JSON; but None, which
    # ChatAdapter writes as `None` and its parser keeps as that text for an Optional[str].
    original = dspy.ChatAdapter().parse(signature, answer)
    assert original["gift_note"] == "None"
    assert json.loads(parsed.outputs_json) == {**to_jsonable_python(original), "gift_note": None}
    assert json.loads(parsed.outputs_json)["order"] == {
        "lines": [{"item": "mug", "quantity": 2}],
        "note": "wrap it",
    }


def test_a_code_field_is_text_as_dspy_writes_it() -> None:
    """`dspy.Code["sql"]` (text-to-SQL, code generation) is the code itself in the answer, as
    ChatAdapter writes and parses it (a fenced block too): it round-trips by its language, the
    prompt is DSPy's, and it is decoded as text, not by its model's JSON schema."""
    import dspy

    from services.runtime.structured import json_schema_of

    signature = dspy.Signature(
        {"question": (str, dspy.InputField()), "tables": (dspy.Code["sql"], dspy.InputField()),
         "sql": (dspy.Code["sql"], dspy.OutputField())}, "Write the query.")  # fmt: skip
    spec = ProgramSpec.from_signature(signature)
    again = ProgramSpec.model_validate_json(spec.model_dump_json())
    assert [f.type for f in again.outputs] == ["Code['sql']"] and again.outputs[
        0
    ].json_schema is None
    codec = PromptCodec(again)
    inputs = {"question": "how many?", "tables": "CREATE TABLE t (id int)"}
    assert codec.format_messages(inputs) == dspy.ChatAdapter().format(signature, [], inputs)
    assert codec.format_assistant({"sql": "SELECT 1"}).startswith("[[ ## sql ## ]]\nSELECT 1\n")
    for written in ("SELECT count(*) FROM t", "```sql\nSELECT count(*) FROM t\n```"):
        parsed = codec.parse(f"[[ ## sql ## ]]\n{written}\n\n[[ ## completed ## ]]")
        assert parsed is not None
        assert json.loads(parsed.outputs_json) == {"sql": "SELECT count(*) FROM t"}
    assert json_schema_of(codec.signature.output_fields["sql"].annotation) is None
    assert again.inputs[1].input_error("SELECT 1") is None


def test_an_output_value_is_written_as_chat_adapter_writes_it() -> None:
    """`outputs` text of a multi-step program's or the API's typed values equals a served
    answer's: JSON for lists, dicts and models (not Python's repr), the text of the rest."""
    from dspy.adapters.utils import format_field_value
    from pydantic.fields import FieldInfo

    from services.core.program import value_text

    line = Line(item="café", quantity=2)
    for value in (line, [line], {"a": 1}, ["x", "y"], True, 3, 2.5, Size.LARGE, "text", None):
        assert value_text(value) == format_field_value(FieldInfo(annotation=Any), value)
    assert value_text([line]) == '[{"item": "café", "quantity": 2}]'


def test_a_value_outside_its_schema_does_not_parse() -> None:
    codec = PromptCodec(ProgramSpec.from_signature(order_signature()))
    good = {"first": {"item": "mug", "quantity": 2}, "order": {"lines": []},
            "size": "large", "counts": {}, "gift_note": "x"}  # fmt: skip
    assert codec.parse(codec.format_assistant(good)) is not None
    for field, bad in (("first", {"item": "mug", "quantity": "two"}), ("first", {"item": "mug"}),
                       ("order", {"lines": [{"quantity": 1}]}), ("size", "medium")):  # fmt: skip
        assert codec.parse(codec.format_assistant({**good, field: bad})) is None, (field, bad)


def test_a_recursive_type_is_refused_naming_it() -> None:
    import dspy

    class Tree(dspy.Signature):
        text: str = dspy.InputField()
        tree: Node = dspy.OutputField()

    with pytest.raises(ProgramFormatError, match="'Node' is recursive"):
        ProgramSpec.from_signature(Tree)


def test_typed_inputs_read_the_wire_text_as_json_and_prompt_like_a_training_row() -> None:
    import dspy

    class Pick(dspy.Signature):
        """Pick one."""

        options: list[str] = dspy.InputField()
        limit: int = dspy.InputField()
        note: str = dspy.InputField()
        choice: str = dspy.OutputField()

    codec = PromptCodec(ProgramSpec.from_signature(Pick))
    row = codec.format_messages({"options": ["tea", "café"], "limit": 2, "note": "[1, 2]"})
    for wire in ('["tea", "café"]', '["tea","caf\\u00e9"]'):
        assert codec.format_messages({"options": wire, "limit": "2", "note": "[1, 2]"}) == row
    assert "[1, 2]" in row[-1]["content"]  # a str field keeps its text as written
    unparsable = codec.format_messages({"options": "tea or coffee", "limit": "2", "note": ""})
    assert "tea or coffee" in unparsable[-1]["content"]


def test_codec_parses_with_value_spans_and_rejects_bad_labels() -> None:
    spec = ProgramSpec(
        instructions="x",
        inputs=[{"name": "q", "type": "str"}],  # type: ignore[list-item]
        outputs=[{"name": "label", "type": "Literal['yes', 'no']"}],  # type: ignore[list-item]
    )
    codec = PromptCodec(spec)
    text = "[[ ## label ## ]]\n yes \n\n"
    parsed = codec.parse(text)
    assert parsed is not None and parsed.outputs == {"label": "yes"}
    start, end = parsed.spans["label"]
    assert text[start:end] == "yes"
    assert codec.parse("[[ ## label ## ]]\nmaybe") is None
    assert codec.parse("no header at all") is None


def test_a_field_name_is_any_python_identifier(tmp_path: Path) -> None:
    """`reseña` is a field name to Python and to DSPy: it round-trips and prompts as one; a
    name no signature could have is refused naming it."""
    from typing import Literal

    import dspy

    signature = dspy.Signature(
        {"reseña": (str, dspy.InputField()),
         "idioma": (Literal["español", "日本語"], dspy.OutputField())}, "Clasifica.")  # fmt: skip
    path = tmp_path / "program.json"
    ProgramSpec.from_signature(signature).save(path)
    codec = PromptCodec(program_from_file(path))
    assert "[[ ## reseña ## ]]\nhola" in codec.format_messages({"reseña": "hola"})[-1]["content"]
    parsed = codec.parse("[[ ## idioma ## ]]\n日本語\n\n[[ ## completed ## ]]")
    assert parsed is not None and parsed.outputs == {"idioma": "日本語"}
    path.write_text(path.read_text().replace("reseña", "two words"))
    with pytest.raises(ProgramFormatError, match="'two words' is not a field name"):
        program_from_file(path)


def test_program_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "program.json"
    bad.write_text(
        json.dumps({**CAPITALS_PROGRAM, "outputs": [{"name": "x", "type": "os.system"}]})
    )
    with pytest.raises(ProgramFormatError, match="not supported"):
        program_from_file(bad)
    with pytest.raises(ProgramFormatError, match="no such program file"):
        program_from_file(tmp_path / "missing.json")


def test_bundle_verification_refuses_a_changed_byte(tmp_path: Path, gguf_path: Path) -> None:
    root = tmp_path / "bundle"
    (root / "model").mkdir(parents=True)
    (root / "program").mkdir()
    (root / "program" / "program.json").write_text(json.dumps(CAPITALS_PROGRAM))
    (root / "model" / "m.gguf").write_bytes(b"GGUF" + bytes(1000))
    write_manifest(root, Manifest(name="t", version="1", default_model="model/m.gguf"))
    assert Bundle.open(root).manifest.files["model/m.gguf"].bytes == 1004
    tampered = tmp_path / "tampered"
    shutil.copytree(root, tampered)
    data = bytearray((tampered / "model" / "m.gguf").read_bytes())
    data[100] ^= 1
    (tampered / "model" / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 differs"):
        Bundle.open(tampered)


@pytest.mark.parametrize(
    ("pieces", "stops", "released", "stopped"),
    [
        ([b"Hel", b"lo wo", b"rld"], (), "Hello world", False),
        ([b"one, tw", b"o, thr", b"ee"], ("two",), "one, ", True),
        ([b"a [[ ## com", b"pleted ## ]] tail"], ("[[ ## completed ## ]]",), "a ", True),
        ([b"ab", b"c"], ("abd",), "abc", False),  # a held prefix is released once ruled out
        ([b"\xe2\x82", b"\xac!"], (), "€!", False),  # a UTF-8 character split across tokens
        ([b"x", b" one two"], ("two", "one"), "x ", True),  # the earliest, not the first named
    ],
)
def test_stop_string_buffer(
    pieces: list[bytes], stops: tuple[str, ...], released: str, stopped: bool
) -> None:
    buffer = StopStringBuffer(stops)
    out = ""
    for piece in pieces:
        text, start, end = buffer.feed(piece)
        out += text
        assert start <= end
        if buffer.stopped:
            break
    out += buffer.flush()
    assert out == released and buffer.stopped == stopped
    whole = b"".join(pieces).decode()
    assert whole.startswith(out + buffer.stopped_by) and (buffer.stopped_by in stops) == stopped


def test_a_tokens_log_probability_goes_with_the_chunk_that_shows_its_text() -> None:
    """Text held back while it might begin a stop string brings its tokens' log-probabilities
    when it is shown; a token cut short by the stop string comes with the last chunk, one
    inside it never (the backend gives such a token no log-probability)."""
    from services.runtime.backends.base import TokenPiece
    from services.runtime.logprobs import ShownLogprobs

    def run(pieces: list[bytes]) -> list[tuple[str, list[str]]]:
        buffer, listed, sent = StopStringBuffer(("END",)), ShownLogprobs(), []
        for piece in pieces:
            text, start, end = buffer.feed(piece)
            swallowed = buffer.stopped and start == end
            listed.add(TokenPiece(text, start, end, None if swallowed else -0.5, piece))
            sent.append((text, [t.token.token for t in listed.shown(text)]))
            if buffer.stopped:
                break
        final = buffer.flush()
        return [*sent, (final, [t.token.token for t in listed.shown(final, last=True)])]

    held_then_shown = [("Hi", ["Hi"]), (" ", []), ("", []), ("EN!", [" E", "N", "!"]), ("", [])]
    assert run([b"Hi", b" E", b"N", b"!"]) == held_then_shown
    assert run([b"Hi", b" E", b"ND", b"more"]) == [("Hi", ["Hi"]), (" ", []), ("", []),
                                                  ("", [" E"])]  # fmt: skip
    assert run([b"Hi", b" E", b"x", b" E"]) == [("Hi", ["Hi"]), (" ", []), ("Ex", [" E", "x"]),
                                               (" ", []), ("E", [" E"])]  # fmt: skip


def same_reading(path: Path) -> None:
    """The fast reader's fields (names, types, offsets, contents, string parts) and tensors
    are gguf-py's own."""
    import gguf

    from services.core.gguf_metadata import open_gguf

    fast, reference = open_gguf(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(reference.fields)
    for name, ours in fast.fields.items():
        theirs = reference.fields[name]
        assert (ours.offset, ours.types) == (theirs.offset, theirs.types), name
        assert ours.contents() == theirs.contents(), name
        if ours.types[-1] == gguf.GGUFValueType.STRING:
            strings = [bytes(theirs.parts[i]) for i in theirs.data]
            assert [bytes(ours.parts[i]) for i in ours.data] == strings, name
    assert [(t.name, t.data_offset, t.n_bytes) for t in fast.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in reference.tensors
    ]


def test_the_fast_gguf_reader_reads_every_array_kind_as_gguf_py_does(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from testkit.processes import smollm2_gguf

    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_array("t.strings", ["a", "", "ünï", "x" * 300])
    writer.add_array("t.empty", [])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_string("t.after", "still read at the right offset")
    writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    same_reading(path)
    same_reading(smollm2_gguf())  # a real 49k-token vocabulary
