"""Structured outputs: the JSON schema recognizer on its own, then the real model's answers, which
must validate against the schema (Pydantic models, as users of both APIs write them), and the
command line. The server's dialects are tested with the official clients in test_clients.py."""

from __future__ import annotations

import datetime
import json
import subprocess
import uuid
import sys
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from influence_tui.engine.json_schema import SchemaError, SchemaPrefix, compile_schema
from test_json_mode import _run, _wordlevel


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    name: str


class Person(BaseModel):
    name: str
    age: int
    pets: list[Pet]
    best_friend: Optional[Pet] = None
    score: float = 0.0


class Weather(BaseModel):
    city: str
    temperature_c: float
    conditions: Literal["sunny", "cloudy", "rain", "snow"]


class Meeting(BaseModel):  # formats Pydantic writes, and a pattern
    title: str
    starts: datetime.datetime
    day: datetime.date
    id: uuid.UUID
    room: str = Field(pattern=r"^[A-Z]-[0-9]{3}$")


class Node(BaseModel):  # recursive: a $ref to itself
    value: int
    children: list["Node"] = []


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "minItems": 1, "maxItems": 2},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
        "ratio": {"type": "number"},
    },
    "required": ["name", "age"],
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}},
}

ACCEPTED = [
    (PERSON, '{"name":"bob","age":3}'),
    (PERSON, '{"age": 3, "name": "bob"}'),  # any order
    (PERSON, '{\n  "name": "a\\n\\u00e9",\n\t"age": 0,\n  "tags": ["a", "bc"],\n  "pet": null\n}'),
    (PERSON, '{"name":"b","age":3,"pet":{"kind":"cat"},"ratio":-1.5e-3}'),
    (True, '{"a":[1,2,{"b":null}],"c":true,"d":"x"}'),
    ({}, '[1, "x", false]'),
    ({"type": "object"}, '{"anything": {"goes": [1]}}'),  # an object without properties takes any keys
    ({"type": ["string", "null"]}, "null"),
    ({"type": "string", "nullable": True}, '"x"'),
    ({"enum": ["red", "green", 3, None]}, "3"),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False}, '[1, "a"]'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     '{"a": 1, "b": "x"}'),
    ({"allOf": [{"$ref": "#/$defs/A"}], "$defs": {"A": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                                       "required": ["a"]}}}, '{"a": false}'),
    ({"type": "string"}, '"\\ud83d\\ude00 and \\u00e9"'),  # a surrogate pair
    ({"type": "number"}, "0.30000000000000004"),  # Python's repr of 0.1 + 0.2
    ({"type": "integer"}, "9223372036854775807"),
    ({"const": {"a": [1, "x"]}}, '{"a":[1,"x"]}'),  # however it is spaced
    ({"const": {"a": [1, "x"]}}, '{"a": [1, "x"]}'),
    ({"enum": [1.0]}, "1"),
    ({"enum": ["Zürich"]}, '"Z\\u00fcrich"'),  # as json.dumps writes it by default
    ({"enum": [f"zone{i}" for i in range(2000)]}, '"zone1999"'),  # a long enum is one matcher
    ({"$ref": "#/$defs/A", "nullable": True, "$defs": {"A": {"type": "integer"}}}, "null"),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"enum": ["a", "b"]}}, '{"b": 2}'),
    ({"type": "string", "format": "date-time"}, '"2024-02-29T23:59:07.25+01:00"'),
    ({"type": "string", "format": "date-time"}, '"2024-05-01T10:30:00"'),
    ({"type": "string", "format": "uuid"}, '"0f8fad5b-d9cb-469f-a165-70867728950e"'),
    ({"type": "string", "format": "email"}, '"not checked"'),  # (a format the server does not know: any string)
    ({"type": "string", "pattern": "^[A-Z]{3}-\\d{3}$"}, '"ABC-123"'),
    ({"type": "string", "pattern": "cat"}, '"my cat!"'),  # JSON Schema's pattern: found anywhere unless anchored
]

REFUSED = [  # no text that starts this way fits the schema
    (PERSON, " {"),  # the value starts at once
    (PERSON, '{"name":"bob"}'),  # age is required
    (PERSON, '{"name":"bobby6"'),  # maxLength 5
    (PERSON, '{"name":"b","age":-'),  # minimum 0: no sign
    (PERSON, '{"name":"b","age":3.'),  # an integer
    (PERSON, '{"name":"b","age":03'),
    (PERSON, '{"name":"b","agex'),  # an undeclared key
    (PERSON, '{"name":"b","name"'),  # a key twice
    (PERSON, '{"name":"b","age":1,"tags":[]'),  # minItems 1
    (PERSON, '{"name":"b","age":1,"tags":["a","a",'),  # maxItems 2
    (PERSON, '{"name":"b","age":1,"tags":["b"'),  # not in the enum
    (PERSON, '{"name":"b","age":1,"pet":{"kind":"dog"'),
    (PERSON, '{"name":"b","age":1,"pet":"cat"'),
    (PERSON, '{"name": "b",  "age"'),  # two spaces: one space, or a newline and an indent
    (PERSON, '{"name": "b",\n' + " " * 21),
    ({"type": ["string", "null"]}, "1"),
    ({"type": "boolean"}, "tru "),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1, 2"),
    ({"type": "integer"}, "1" * 21),  # a number cannot grow forever
    ({"type": "string", "format": "date"}, '"2024-02-30'),  # no such day
    ({"type": "string", "format": "date"}, '"2024-13'),
    ({"type": "string", "format": "date-time"}, '"tomorrow'),
    ({"type": "string", "format": "time"}, '"25:'),
    ({"type": "string", "pattern": "^[A-Z]{3}-\\d{3}$"}, '"AB1'),
    ({"type": "string", "pattern": "cat"}, '"my dog"'),  # it may not end without one
    ({"type": "string"}, '"\\ud800"'),  # a lone surrogate is not Unicode (Pydantic refuses it)
    ({"type": "string"}, '"\\udc00'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "oneOf": [{"required": ["a"]}]}, '"x"'),  # beside oneOf
    ({"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"enum": ["a", "b"]}}, '{"c'),
    ({"type": "object", "properties": {"ab": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     '{"ab": 1, "a\\u0062"'),  # the same key, escaped
    ({"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"a": {"minimum": 0}}}]}, '{"a": "'),
    ({"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"a": {"minimum": 0}}}]}, '{"a": -'),
]


def prefix(schema, text: str) -> SchemaPrefix | None:
    state = SchemaPrefix(compile_schema(schema))
    return state if state.feed(text) else None


@pytest.mark.parametrize("schema, text", ACCEPTED)
def test_values_that_fit_the_schema_are_accepted_whole_and_in_pieces(schema, text):
    json.loads(text)
    state = prefix(schema, text)
    assert state is not None and state.can_end
    for cut in range(len(text)):  # any split into two pieces reads the same
        state = SchemaPrefix(compile_schema(schema))
        assert state.feed(text[:cut])
        assert state.feed(text[cut:]) and state.can_end


@pytest.mark.parametrize("schema, text", REFUSED)
def test_what_does_not_fit_the_schema_is_refused(schema, text):
    assert prefix(schema, text) is None


def test_prefixes_are_not_complete_and_copies_are_independent():
    state = prefix(PERSON, '{"name":"b","age":1')
    assert state is not None and not state.complete  # the number may go on, the object is open
    trial = state.copy()
    assert trial.feed("2}") and trial.complete
    assert not state.complete and state.feed(', "pet": null}') and state.complete
    assert not state.copy().feed(" ")  # nothing may follow the value


def test_a_number_at_the_top_may_end_or_go_on():
    state = prefix({"type": "number"}, "12")
    assert state is not None and state.can_end and not state.complete
    assert state.copy().feed(".5")
    dot = prefix({"type": "number"}, "12.")
    assert dot is not None and not dot.can_end  # a fraction needs its digits


@pytest.mark.parametrize("model, instance", [
    (Person, Person(name="Ann", age=31, pets=[Pet(kind="cat", name="Tom"), Pet(kind="dog", name="Rex")], score=2.5)),
    (Person, Person(name="Bo", age=0, pets=[], best_friend=Pet(kind="dog", name='"Q"'))),
    (Node, Node(value=1, children=[Node(value=2, children=[Node(value=3)]), Node(value=-4)])),
    (Meeting, Meeting(title="Plan", starts=datetime.datetime(2024, 5, 1, 10, 30, tzinfo=datetime.timezone.utc),
                      day=datetime.date(2024, 5, 1), id=uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e"), room="B-204")),
])
def test_pydantic_models_and_their_instances(model, instance):
    schema = model.model_json_schema()
    for text in (instance.model_dump_json(), json.dumps(instance.model_dump(mode="json"), indent=2)):
        state = prefix(schema, text)
        assert state is not None and state.complete, text
    wrong = instance.model_dump(mode="json")
    wrong["surprise"] = 1  # a key the model does not declare
    assert prefix(schema, json.dumps(wrong)) is None


@pytest.mark.parametrize("schema, message", [
    (False, "#: the schema false accepts no value"),
    ({"type": "int"}, "#/type: unknown type 'int'"),
    ({"properties": {"a": {"$ref": "#/$defs/Missing"}}}, "$ref '#/$defs/Missing' points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "$ref 'https://example.com/s.json': only references into the schema itself (#/...) are followed"),
    ({"enum": []}, "#/enum: must be a non-empty list"),
    ({"type": "string", "maxLength": -1}, "#/maxLength: must be a whole number >= 0"),
    ({"type": "object", "properties": {}, "required": ["x"], "additionalProperties": False},
     "#/required: 'x' is required but not allowed"),
    ([1], "#: a schema must be an object"),
    ({"$ref": "#"}, "#: the schema accepts no value (it refers only to itself)"),
    ({"anyOf": [{"$ref": "#"}]}, "#: the schema accepts no value (it refers only to itself)"),
    ({"allOf": [{"$ref": 5}]}, "#/allOf/0: $ref must be a string that leads to a schema"),
    ({"allOf": [{"required": ["a"]}, {"required": [1]}]}, "#/allOf/1/required: must be a list of names"),
    ({"$ref": "#/anyOf/²", "anyOf": [{}]}, "$ref '#/anyOf/²' points at nothing"),
    ({"enum": [float("nan")]}, "#/enum: nan is not a JSON value"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "#: minItems 3 is more than maxItems 1: no value fits"),
    ({"type": "string", "minLength": 3, "maxLength": 1}, "#: minLength 3 is more than maxLength 1: no value fits"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "#/allOf/1/type: no value is both 'string' and 'integer'"),
    ({"type": "string", "pattern": "(unclosed"}, "#/pattern: not a regular expression this server reads"),
])
def test_schemas_that_cannot_be_followed_say_where(schema, message):
    with pytest.raises(SchemaError) as err:
        compile_schema(schema)
    assert str(err.value).startswith(message)  # (a regex error goes on with its own words)


def test_the_sampler_keeps_to_the_schema_and_may_end_a_top_level_number():
    from influence_tui.engine.constrain import JsonSampler, vocabulary
    from influence_tui.engine.json_schema import SchemaPrefix
    from influence_tui.engine.sampling import Sampler
    from influence_tui.params import GenerationParams

    vocab = {"<unk>": 0, "</s>": 1, "{": 2, '"': 3, "a": 4, "b": 5, ":": 6, "1": 7, "}": 8, "2": 9}
    tok = _wordlevel(vocab, sentencepiece=True)  # (tokens printed without spaces between them)
    schema = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}

    def sampler(schema):
        return JsonSampler(Sampler(GenerationParams(temperature=0.0)), vocabulary(tok),
                           {1}, SchemaPrefix(compile_schema(schema)))

    # the model wants key "a" and to close early: the schema makes it "b", and an integer
    s = sampler(schema)
    text = _run(s, len(vocab), [[2], [3], [4, 5], [3], [6], [8, 7], [8]], tok)
    assert text == '{"b":1}' and s.complete
    # a number at the top: the end of text is allowed once it is a whole number
    s = sampler({"type": "integer"})
    assert _run(s, len(vocab), [[1, 7], [9], [1]], tok) == "12" and s.complete


# -- the real model -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_models_answers_validate_against_pydantic_schemas(engine, temperature):
    from influence_tui.engine import ChatMessage, GenerationRequest
    from influence_tui.params import GenerationParams

    params = GenerationParams(temperature=temperature, max_tokens=300, seed=3)
    for model, question in ((Person, "Describe a person who has two pets."), (Pet, "Name a pet."),
                            (Weather, "What is the weather like in Oslo today?"),
                            (Meeting, "Plan a meeting next Monday at 10am.")):
        result = engine.generate(GenerationRequest(messages=[ChatMessage("user", question)], params=params,
                                                   format="json", json_schema=model.model_json_schema()))
        assert result.finish_reason == "stop", result.text  # it ended because the value closed
        model.model_validate_json(result.text)  # raises if the answer does not fit


def test_a_schema_batched_with_plain_requests_leaves_them_unchanged(engine):
    from influence_tui.engine import GenerationRequest
    from influence_tui.params import GenerationParams

    params = GenerationParams(temperature=0, max_tokens=40, repeat_penalty=1.0)
    alone = engine.generate(GenerationRequest(prompt="Tell me about the sea.", params=params)).text
    streams = engine.submit_many([
        GenerationRequest(prompt="Tell me about the sea.", params=params),
        GenerationRequest(prompt="Name a pet.", params=GenerationParams(temperature=0, max_tokens=100),
                          format="json", json_schema=Pet.model_json_schema()),
        GenerationRequest(prompt="Name a pet.", format="json", json_schema={"type": "pet"}),
    ])
    together, constrained, bad = (s.wait(timeout=120) for s in streams)
    assert together.text == alone
    assert constrained.finish_reason == "stop" and Pet.model_validate_json(constrained.text)
    assert bad.finish_reason == "error" and bad.error == "JSON schema: #/type: unknown type 'pet'"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, timeout=180)


def test_generate_and_batch_take_a_schema_from_the_command_line(tmp_path):
    schema_file = tmp_path / "pet.json"
    schema_file.write_text(json.dumps(Pet.model_json_schema()))
    out = _cli("generate", "Name a pet.", "--format", str(schema_file), "--temperature", "0", "--max-tokens", "100")
    assert out.returncode == 0, out.stderr
    Pet.model_validate_json(out.stdout)
    inline = _cli("generate", "Pick a number.", "--format", '{"type": "integer", "minimum": 0}', "--max-tokens", "20")
    assert inline.returncode == 0 and inline.stdout.strip().isdigit(), inline
    for bad, message in ((str(tmp_path / "missing.json"), "error: cannot read"),
                         ('{"type": "int"}', "error: --format: JSON schema: #/type: unknown type 'int'"),
                         ("{oops", "error: the --format schema is not valid JSON")):
        out = _cli("generate", "hi", "--format", bad)
        assert out.returncode == 2 and out.stderr.startswith(message) and len(out.stderr.splitlines()) == 1, out.stderr
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "Name a pet.", "format": Pet.model_json_schema(), "temperature": 0}) + "\n"
                     + json.dumps({"prompt": "Hi", "format": {"type": "pet"}}) + "\n")
    out = _cli("--batch", str(batch))
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    Pet.model_validate_json(rows[0]["text"])
    assert rows[1]["error"] == "line 2: format: JSON schema: #/type: unknown type 'pet'"
