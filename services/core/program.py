"""The served program's format: a DSPy signature (+ demos) as LM-free JSON, and the prompt codec.

The builder writes `program.json` from the teacher's DSPy module; the runtime rebuilds the
signature from it and formats every call with the same adapter the student was trained on, so
serving prompts are byte-identical to training prompts.

Prompt formats (`prompt_format` in program.json):
- `chat`: DSPy's ChatAdapter as is; the output-format reminder closes the user message, after
  the call's inputs. Bundles from before the field existed.
- `prefix-first`: ChatAdapter with the reminder opening the user message, so everything fixed
  (instructions, field descriptions, demos, reminder) comes before the inputs and a cached
  prompt prefix covers all of it. What builds write.
"""

from __future__ import annotations

import ast
import copy
import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, field_validator

PROGRAM_FORMAT_VERSION = 1
PromptFormat = Literal["chat", "prefix-first"]
BUILD_PROMPT_FORMAT: PromptFormat = "prefix-first"
_FIELD_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
# The marker DSPy's ChatAdapter ends every answer with: a natural stop string.
COMPLETED_MARKER = "[[ ## completed ## ]]"


class ProgramFormatError(ValueError):
    """program.json is unreadable or describes a signature we cannot rebuild."""


class FieldSpec(BaseModel):
    name: str
    description: str = ""
    # The annotation as text: str, int, float, bool, list[str], Literal['a', 'b'], Order, ...
    type: str = "str"
    # A type the text cannot rebuild (it names a class: a pydantic model, a TypedDict, ...):
    # its JSON Schema with references inlined; its values are served as JSON of that schema.
    json_schema: dict[str, Any] | None = None
    # An Enum: its members' values, served as a choice among them.
    enum_values: list[str | int | float | bool] | None = None
    # An input a request may leave out: a multi-step program's `forward` parameter with a
    # default (the default is then used).
    required: bool = True

    @field_validator("name")
    @classmethod
    def _is_identifier(cls, name: str) -> str:
        # A Python identifier, as a signature's fields are: `reseña` too, as DSPy allows.
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a field name (a Python identifier)")
        return name

    @classmethod
    def describe(cls, name: str, info: Any, standalone: bool = True) -> FieldSpec:
        """A DSPy signature field (its pydantic FieldInfo) as LM-free JSON."""
        annotation = info.annotation
        text = _annotation_to_text(annotation)
        described = cls(
            name=name, description=str((info.json_schema_extra or {}).get("desc", "")), type=text
        )
        if _text_rebuilds(text, annotation):
            return described
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            return described.model_copy(update={"enum_values": [m.value for m in annotation]})
        try:
            schema = inlined_json_schema(annotation, text)
        except ProgramFormatError:
            if standalone:
                raise
            return described
        return described.model_copy(update={"json_schema": schema})

    @property
    def stated_description(self) -> str:
        """The description its author wrote: "" for DSPy's placeholder `${name}`, which DSPy
        gives a field declared without one (kept in `description` so prompts stay DSPy's)."""
        return "" if self.description == f"${{{self.name}}}" else self.description

    def annotation(self) -> Any:
        """The type this field's values are parsed as (and its prompt describes)."""
        if self.enum_values is not None:
            return enum.Enum(self.type, [(str(v), v) for v in self.enum_values])
        if self.json_schema is not None:
            return schema_type(self.type, self.json_schema)
        return _annotation_from_text(self.type)

    @property
    def is_history(self) -> bool:
        """A dspy.History input (not a user's own model of that name, which has a schema)."""
        return self.type == "History" and self.json_schema is None

    @property
    def is_text(self) -> bool:
        """A plain `str` field: any text is one of its values, taken as is."""
        return self.type == "str" and self.json_schema is None and self.enum_values is None

    def forward_value(self, value: Any) -> Any:
        """The value a program's `forward` is handed for this input, alike whether it came
        from a JSONL row, a CSV cell or a request's text: a `str` as is, a number or bool as
        one, a choice as its value, any other type as its JSON data (`["a"]`, `{"item": ...}`)
        as a JSONL row holds it. The Python between a program's calls sees in serving what
        it saw when the teacher ran."""
        if self.is_text:  # before annotation(): this runs per input of every request
            return value
        annotation = self.annotation()
        text = input_text(value)
        if annotation in (int, float, bool):
            return _type_adapter(self.model_dump_json()).validate_python(_json_or_text(text))
        choices = choice_values(annotation)
        if choices is not None:
            values = [c.value if isinstance(c, enum.Enum) else c for c in choices]
            return next((v for v in values if input_text(v) == text), text)
        return _json_or_text(text)

    def input_error(self, text: str) -> str | None:
        """Why a call's input `text` is not a value of this field's type, read as the codec
        reads it (JSON where it parses, else the text); None when it is. Any text is a `str`."""
        if self.is_text:
            return None
        from pydantic import ValidationError

        adapter = _type_adapter(self.model_dump_json())
        problem = ""
        parsed = _json_or_text(text)
        if self.is_history:
            parsed = _history_data(parsed)
        for value in (parsed, text):
            try:
                adapter.validate_python(value)
                return None
            except (ValidationError, ValueError) as err:
                problem = problem or _first_error(err)
        # JSON is how a list, dict or model is sent; a number or a choice is sent as written.
        annotation = self.annotation()
        scalar = annotation in (int, float) or choice_values(annotation) is not None
        hint = "" if scalar else "; send the value as JSON"
        return f"{text[:60]!r} is not of type {self.type} ({problem}){hint}"


@lru_cache(maxsize=256)
def _type_adapter(field_json: str) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(FieldSpec.model_validate_json(field_json).annotation())


def _first_error(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return str(err.errors()[0]["msg"])
    return str(err)


class ProgramSpec(BaseModel):
    """A single-predictor DSPy program without its LM: what the runtime needs to serve it."""

    format_version: int = PROGRAM_FORMAT_VERSION
    name: str = "program"
    instructions: str
    inputs: list[FieldSpec] = Field(min_length=1)
    outputs: list[FieldSpec] = Field(min_length=1)
    demos: list[dict[str, Any]] = Field(default_factory=list)
    # Absent from older program.json files: they were trained on ChatAdapter as is.
    prompt_format: PromptFormat = "chat"

    @classmethod
    def load(cls, path: Path) -> ProgramSpec:
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as err:
            raise ProgramFormatError(f"{path}: not a valid program.json: {err}") from err

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def from_signature(
        cls, signature: Any, *, name: str = "program", demos: list[dict[str, Any]] | None = None,
        prompt_format: PromptFormat = "chat", standalone: bool = True,
    ) -> ProgramSpec:  # fmt: skip
        """Describe a dspy.Signature class. `standalone`: the description alone must rebuild
        it (a single-predictor program); a multi-step program's predictors run from their
        source, and a type the description cannot carry is kept as its text only."""

        def fields(items: dict[str, Any]) -> list[FieldSpec]:
            return [
                FieldSpec.describe(field_name, info, standalone)
                for field_name, info in items.items()
            ]

        return cls(
            name=name,
            instructions=signature.instructions,
            inputs=fields(signature.input_fields),
            outputs=fields(signature.output_fields),
            demos=demos or [],
            prompt_format=prompt_format,
        )

    def to_signature(self) -> Any:
        """Rebuild the dspy.Signature class."""
        import dspy

        spec: dict[str, Any] = {}
        for field in self.inputs:
            spec[field.name] = (field.annotation(), dspy.InputField(desc=field.description))
        for field in self.outputs:
            spec[field.name] = (field.annotation(), dspy.OutputField(desc=field.description))
        return dspy.make_signature(spec, self.instructions, signature_name=_class_name(self.name))


@dataclass(frozen=True)
class ParsedAnswer:
    outputs: dict[str, str]
    # Character span [start, end) of each output field's value inside the completion text.
    spans: dict[str, tuple[int, int]]
    # The values as DSPy parsed them by their annotations (bool, int, list, ...).
    values: dict[str, Any]

    @property
    def outputs_json(self) -> str:
        return typed_json(self.values, list(self.outputs))


def value_text(value: Any) -> str:
    """An output value as ChatAdapter writes it in an answer, what `outputs` carries: lists,
    dicts and models as JSON, anything else as its text (`True`, `3`, an Enum's value)."""
    import json

    from pydantic_core import to_jsonable_python

    data = to_jsonable_python(value, fallback=str)
    return json.dumps(data, ensure_ascii=False) if isinstance(data, dict | list) else str(data)


def label_text(value: Any) -> str:
    """A value as labels are counted and compared: its text as an answer writes it (an Enum's
    value, a list as JSON), lowercase, spaces collapsed (a CSV's `3` is the int 3)."""
    return " ".join(value_text(value).strip().lower().split())


def typed_json(values: dict[str, Any], names: list[str]) -> str:
    """Output values as one JSON object in the signature's order, each typed (bool as
    true/false, numbers, lists and models as JSON), as the wire's `outputs_json` carries them."""
    import json

    from pydantic_core import to_jsonable_python

    return json.dumps({name: to_jsonable_python(values[name], fallback=str) for name in names})


class PromptCodec:
    """Formats program inputs into chat messages and parses completions, as ChatAdapter does."""

    def __init__(self, spec: ProgramSpec, signature: Any = None) -> None:

        self.spec = spec
        self.signature = spec.to_signature() if signature is None else signature
        self._adapter = chat_adapter(spec.prompt_format)
        self.demos: list[Any] = list(spec.demos)
        self.input_names = [f.name for f in spec.inputs]
        self.output_names = [f.name for f in spec.outputs]
        # A JSON output whose schema depends on the value an earlier output chose: field ->
        # (that output, {its value: JSON Schema}); ReAct's arguments by the tool it names.
        self.value_schemas: dict[str, tuple[str, dict[str, str]]] = {}

    @classmethod
    def for_signature(
        cls, signature: Any, demos: list[Any], prompt_format: PromptFormat = "chat"
    ) -> PromptCodec:
        """A predictor's own signature (its real types, not their text) and demos: the
        prompts a multi-step program's predictor sends when DSPy runs it."""
        spec = ProgramSpec.from_signature(signature, prompt_format=prompt_format, standalone=False)
        codec = cls(spec, signature)
        codec.demos = list(demos)
        return codec

    def format_messages(self, inputs: dict[str, Any]) -> list[dict[str, str]]:
        messages = self._adapter.format(self.signature, self.demos, self.decode_inputs(inputs))
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]

    def placeholder_inputs(self, text: str) -> dict[str, str]:
        """Inputs of any value, to render the prompt's fixed part: `text` in every field, an
        empty conversation in a History."""
        return {f.name: "[]" if f.is_history else text for f in self.spec.inputs}

    def decode_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A call's inputs as the wire carries them (text) to the values DSPy formats: a field
        typed other than `str` reads its text as JSON where it parses (`["a", "b"]` a list,
        `3` a number), so a client's JSON and a training row's value give the same prompt."""
        fields = self.signature.input_fields
        decoded: dict[str, Any] = {}
        for name, value in inputs.items():
            text = input_text(value)
            annotation = fields[name].annotation if name in fields else str
            decoded[name] = text if annotation is str else _json_or_text(text)
            if is_history(annotation):  # ChatAdapter formats it as the turns before this one
                decoded[name] = as_history(decoded[name])
        return decoded

    def format_finetune(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        """A chat-format training record: the serving prompt plus the answer to learn."""
        record: dict[str, Any] = self._adapter.format_finetune_data(
            self.signature, self.demos, inputs, outputs
        )
        record["messages"] = [
            {"role": m["role"], "content": str(m["content"])} for m in record["messages"]
        ]
        return record

    def format_assistant(self, outputs: dict[str, Any]) -> str:
        return str(self._adapter.format_assistant_message_content(self.signature, outputs))

    def parse(self, completion: str) -> ParsedAnswer | None:
        """The output fields as text with their spans, or None when the completion does not parse.

        Values are checked against their annotations with DSPy's own parser (a Literal field
        accepts only its labels) but returned as text: the wire carries strings.
        """
        import dspy

        try:
            values = self._adapter.parse(self.signature, completion)
        except dspy.utils.exceptions.AdapterParseError:
            return None
        for name, info in self.signature.output_fields.items():
            values[name] = none_as_written(values[name], info.annotation)
        outputs: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        headers = list(_FIELD_HEADER.finditer(completion))
        for index, header in enumerate(headers):
            name = header.group(1)
            if name not in self.output_names or name in outputs:
                continue
            end = headers[index + 1].start() if index + 1 < len(headers) else len(completion)
            raw = completion[header.end() : end]
            value = raw.strip()
            start = header.end() + (len(raw) - len(raw.lstrip()))
            outputs[name] = value
            spans[name] = (start, start + len(value))
        if set(outputs) != set(self.output_names):
            return None
        ordered = {name: outputs[name] for name in self.output_names}
        return ParsedAnswer(outputs=ordered, spans=spans, values=values)


def admits_none(annotation: Any) -> bool:
    """A union with None among its members (`int | None`, `Optional[str]`)."""
    return get_origin(annotation) in (Union, UnionType) and NoneType in get_args(annotation)


def optional_inner(annotation: Any) -> tuple[Any, bool]:
    """`X | None` (Optional[X]) as X and True; any other annotation as itself and False."""
    others = [arg for arg in get_args(annotation) if arg is not NoneType]
    if not admits_none(annotation) or len(others) != 1:
        return annotation, False
    return others[0], True


def pydantic_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation holds (`list[Item]`, `Item | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in pydantic_models(arg)]


def none_as_written(value: Any, annotation: Any) -> Any:
    """None for a value of a type that admits None (`str | None`) holding `None`, the text
    ChatAdapter writes for None in demos and training; DSPy's parser keeps it as that text."""
    if value == "None" and admits_none(annotation):
        return None
    return value


def blank_as_none(value: Any, annotation: Any) -> Any:
    """None for a blank label (a CSV's empty cell: CSV has no null) of a type that admits
    None (`int | None`)."""
    if isinstance(value, str) and not value.strip() and admits_none(annotation):
        return None
    return value


def output_annotations(program: Any) -> dict[str, Any]:
    """Each output field's type, from the predictor that first produces it."""
    found: dict[str, Any] = {}
    for predictor in program.predictors():
        for name, info in predictor.signature.output_fields.items():
            found.setdefault(name, info.annotation)
    return found


def typed_value(value: Any, annotation: Any) -> Any:
    """An answer's value read as its type, as DSPy's parser reads it (None as written)."""
    from dspy.adapters.utils import parse_value

    return none_as_written(parse_value(value, annotation), annotation)


def input_text(value: Any) -> str:
    """An input value as the wire carries it: text as is, anything else as JSON."""
    import json

    from pydantic_core import to_jsonable_python

    if isinstance(value, str):
        return value
    return json.dumps(to_jsonable_python(value), ensure_ascii=False)


def choice_values(annotation: Any) -> tuple[Any, ...] | None:
    """The values a choice type allows (a Literal's, an Enum's members, a bool's True and
    False); None for any other type."""
    if annotation is bool:
        return (True, False)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(annotation)
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return None


def is_history(annotation: Any) -> bool:
    """A dspy.History field: the conversation so far, formatted by ChatAdapter as turns."""
    return getattr(annotation, "__name__", "") == "History" and "dspy" in getattr(
        annotation, "__module__", ""
    )


def is_code(annotation: Any) -> bool:
    """A `dspy.Code[...]` field: code as text, which ChatAdapter writes as the code itself
    (its parser also takes a fenced block), not as JSON of its model."""
    import dspy

    return isinstance(annotation, type) and issubclass(annotation, dspy.Code)


def as_history(value: Any) -> Any:
    """A dspy.History from what a row or a request holds: one already, `{"messages": [...]}`,
    or the list of turns itself (each a dict of the signature's fields)."""
    import dspy

    if isinstance(value, dspy.History):
        return value
    return dspy.History.model_validate(_history_data(value))


def _history_data(value: Any) -> Any:
    return {"messages": value} if isinstance(value, list) else value


def _json_or_text(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def chat_adapter(prompt_format: PromptFormat) -> Any:
    """The adapter a prompt format trains and serves with. No JSON fallback: the student
    learned this format only."""
    import dspy

    if prompt_format == "chat":
        return dspy.ChatAdapter(use_json_adapter_fallback=False)

    class PrefixFirstAdapter(dspy.ChatAdapter):
        """ChatAdapter with the output-format reminder before the call's inputs."""

        def format_user_message_content(
            self, signature: Any, inputs: dict[str, Any], prefix: str = "", suffix: str = "",
            main_request: bool = False,
        ) -> str:  # fmt: skip
            if main_request:
                reminder = self.user_message_output_requirements(signature)
                prefix = f"{prefix}\n\n{reminder}".strip()
            return str(super().format_user_message_content(signature, inputs, prefix, suffix))

    return PrefixFirstAdapter(use_json_adapter_fallback=False)


def program_from_file(path: Path) -> ProgramSpec:
    if not path.is_file():
        raise ProgramFormatError(f"{path}: no such program file")
    spec = ProgramSpec.load(path)
    if spec.format_version != PROGRAM_FORMAT_VERSION:
        raise ProgramFormatError(
            f"{path}: program format {spec.format_version}, this edgedistill reads "
            f"{PROGRAM_FORMAT_VERSION}"
        )
    try:
        spec.to_signature()
    except ProgramFormatError:
        raise
    except Exception as err:
        raise ProgramFormatError(f"{path}: cannot rebuild the signature: {err}") from err
    return spec


def _class_name(name: str) -> str:
    cleaned = re.sub(r"[^0-9A-Za-z]+", " ", name).title().replace(" ", "")
    return cleaned if cleaned and cleaned[0].isalpha() else "Program"


_SIMPLE_TYPES: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "NoneType": type(None), "Any": Any,
    "list": list, "dict": dict,
}  # fmt: skip
_SUPPORTED = (
    "str, int, float, bool, Literal, list, dict, tuple, Optional/Union, Enum, pydantic models, "
    "dspy.History, dspy.Code"
)


class SchemaValue:
    """Base of the types rebuilt from a stored JSON Schema (`schema_type`): the structured
    decoder constrains their values with llama.cpp's JSON-schema grammar."""

    json_schema: ClassVar[dict[str, Any]] = {}


def schema_type(name: str, json_schema: dict[str, Any]) -> type[SchemaValue]:
    """A type named `name` (as DSPy prints it in prompts) whose values are JSON valid against
    `json_schema`, and whose JSON Schema (what ChatAdapter shows the model) is `json_schema`."""
    import jsonschema
    from pydantic_core import core_schema

    validator = jsonschema.Draft202012Validator(json_schema)

    def validate(value: Any) -> Any:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            raise ValueError(f"not a {name}: {error.message}")
        return value

    def core(cls: type, source: Any, handler: Any) -> Any:
        return core_schema.no_info_plain_validator_function(validate)

    def schema(cls: type, core_schema_: Any, handler: Any) -> dict[str, Any]:
        return copy.deepcopy(json_schema)

    namespace = {
        "json_schema": json_schema,
        "__get_pydantic_core_schema__": classmethod(core),
        "__get_pydantic_json_schema__": classmethod(schema),
    }
    return type(name, (SchemaValue,), namespace)


def inlined_json_schema(annotation: Any, text: str) -> dict[str, Any]:
    """The JSON Schema of an annotation with its `$defs` references inlined (pydantic keeps
    references in the document's root, which a rebuilt field type cannot carry)."""
    from pydantic import TypeAdapter

    try:
        document = TypeAdapter(annotation).json_schema()
    except Exception as err:
        raise ProgramFormatError(
            f"field type {text!r} has no JSON Schema ({type(err).__name__}: {err}); "
            f"use one of: {_SUPPORTED}"
        ) from err
    definitions = document.get("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = str(node["$ref"]).rsplit("/", 1)[-1]
            if name in seen or name not in definitions:
                raise ProgramFormatError(
                    f"field type {text!r} is recursive ({name} contains itself): a served value "
                    "needs a finite schema; use a type without self-reference"
                )
            return inline(definitions[name], (*seen, name))
        return {key: inline(value, seen) for key, value in node.items() if key != "$defs"}

    inlined: dict[str, Any] = inline(document, ())
    return inlined


def _annotation_to_text(annotation: Any) -> str:
    from dspy.adapters.utils import get_annotation_name

    if is_code(annotation):
        return f"Code[{annotation.language!r}]"
    return str(get_annotation_name(annotation))


def _text_rebuilds(text: str, annotation: Any) -> bool:
    """Whether the text alone rebuilds the type (`List[str]` as `list[str]`, alike); `History`
    only when it is dspy.History, not a user's own model of that name."""
    try:
        rebuilt = _annotation_from_text(text)
    except ProgramFormatError:
        return False
    if is_code(rebuilt):  # dspy.Code[...] makes a new class each time: same language
        return is_code(annotation) and rebuilt.language == annotation.language
    return "History" not in text or bool(rebuilt == annotation)


def _annotation_from_text(text: str) -> Any:
    """Parse an annotation written as text, allowing only plain, safe types."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as err:
        raise ProgramFormatError(f"field type {text!r} is not a type expression") from err
    return _annotation_from_node(tree, text)


def _annotation_from_node(node: ast.expr, text: str) -> Any:
    if isinstance(node, ast.Name) and node.id in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[node.id]
    if isinstance(node, ast.Name) and node.id == "History":
        import dspy

        return dspy.History
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if node.value.id == "Code" and len(args) == 1 and isinstance(args[0], ast.Constant):
            import dspy

            return dspy.Code[str(args[0].value)]
        if node.value.id == "Literal":
            values = []
            for arg in args:
                if not isinstance(arg, ast.Constant):
                    raise ProgramFormatError(f"field type {text!r}: Literal takes constants only")
                values.append(arg.value)
            return Literal[tuple(values)]
        inner = tuple(_annotation_from_node(arg, text) for arg in args)
        generic, arity_ok = _GENERICS.get(node.value.id, (None, None))
        if generic is not None and arity_ok(len(inner)):
            return generic[inner if len(inner) > 1 else inner[0]]
    raise ProgramFormatError(f"field type {text!r} is not supported ({_SUPPORTED})")


# Each generic the text may name, with the number of arguments it takes.
_GENERICS: dict[str, tuple[Any, Any]] = {
    "list": (list, lambda n: n == 1), "dict": (dict, lambda n: n == 2),
    "tuple": (tuple, lambda n: n >= 1), "Union": (Union, lambda n: n >= 2),
}  # fmt: skip
