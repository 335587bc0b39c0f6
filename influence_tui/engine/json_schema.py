"""Structured outputs: answers that follow a JSON schema (Ollama's `format: {schema}`, OpenAI's
`response_format: {"type": "json_schema", ...}`, `influence generate --format schema.json`).

The schema is compiled once into a small tree of matchers (object, array, string, number, literal,
union). Text is recognized character by character as a set of parse stacks, each a linked tuple of
immutable frames, so trying a candidate token copies nothing (constrain.JsonSampler tries a few per
step) and a union (`anyOf`, `enum`, a type list) is simply several stacks until a character tells
them apart.

What a schema constrains, as llama.cpp's json-schema-to-grammar does (the converter Ollama uses):
`type` (one or a list), `properties` / `required` / `additionalProperties` (an object with
`properties` takes only those keys unless `additionalProperties` says otherwise; keys may come in
any order, each once, the required ones before it closes), `items` / `prefixItems` / `minItems` /
`maxItems`, `enum`, `const`, `anyOf` / `oneOf` / `allOf`, `$ref` into the schema (`$defs`,
`definitions`: Pydantic's nested models, recursion included), `nullable`, a string's `minLength` /
`maxLength`, and a number's sign (`minimum` >= 0 takes no minus). Keywords that do not change the
shape (`title`, `description`, `default`, `examples`, `format`, `pattern`, bounds other than the
sign) are not enforced: a value with a `pattern` is still any string.
"""

from __future__ import annotations

import json
from typing import Any

from influence_tui.engine.constrain import ESCAPES, HEX, WHITESPACE

MAX_DIGITS = 16  # digits of a number's integer or fraction part (a model cannot write digits forever)
MAX_INDENT = 20  # spaces or tabs after a newline between tokens (llama.cpp's grammars take 20)
MAX_DEPTH = 64  # values nested in values (the recognizer recurses once per level)
MAX_STATES = 512  # parse stacks kept at once (a pathological union cannot grow them without bound)

Frame = tuple  # (node, ...its own state): immutable, so stacks share them
Stack = tuple  # (frame, parent stack or None, depth)


class SchemaError(ValueError):
    """A schema this recognizer cannot follow; the message says where."""


class Node:
    __slots__ = ()

    def start(self) -> list[Frame]:
        raise NotImplementedError

    def step(self, frame: Frame, ch: str) -> list[tuple[Frame, "Node | None", bool]]:
        """The frame after `ch`: (new frame, a child to push or None, whether `ch` was used)."""
        raise NotImplementedError

    def can_end(self, frame: Frame) -> bool:
        return False

    def closed(self, frame: Frame) -> bool:
        """Ended and takes nothing more (a number may always take another digit)."""
        return self.can_end(frame)


class Literal(Node):
    """One exact JSON text: a `const`, an `enum` member, true / false / null."""

    __slots__ = ("text",)

    def __init__(self, value: Any) -> None:
        self.text = json.dumps(value, ensure_ascii=False)

    def start(self) -> list[Frame]:
        return [(self, 0)]

    def step(self, frame: Frame, ch: str) -> list:
        i = frame[1]
        return [((self, i + 1), None, True)] if i < len(self.text) and self.text[i] == ch else []

    def can_end(self, frame: Frame) -> bool:
        return frame[1] == len(self.text)


class String(Node):
    """A JSON string of min_len..max_len characters (an escape is one)."""

    __slots__ = ("min_len", "max_len")

    def __init__(self, min_len: int = 0, max_len: int | None = None) -> None:
        self.min_len, self.max_len = min_len, max_len

    def start(self) -> list[Frame]:
        return [(self, 0, 0, False, 0)]  # phase (0 before, 1 inside, 2 done), length, escape, \u digits left

    def step(self, frame: Frame, ch: str) -> list:
        _, phase, n, escape, hex_left = frame
        if phase == 0:
            return [((self, 1, 0, False, 0), None, True)] if ch == '"' else []
        if phase == 2:
            return []
        if hex_left:
            return [((self, 1, n, False, hex_left - 1), None, True)] if ch in HEX else []
        if escape:
            return [((self, 1, n, False, 4 if ch == "u" else 0), None, True)] if ch in ESCAPES else []
        if ch == '"':
            return [((self, 2, n, False, 0), None, True)] if n >= self.min_len else []
        if ch < " " or (self.max_len is not None and n >= self.max_len):  # control characters must be escaped
            return []
        return [((self, 1, n + 1, ch == "\\", 0), None, True)]

    def can_end(self, frame: Frame) -> bool:
        return frame[1] == 2


class Number(Node):
    """A JSON number; an integer has no fraction or exponent; unsigned takes no minus."""

    __slots__ = ("integer", "signed")

    def __init__(self, integer: bool = False, signed: bool = True) -> None:
        self.integer, self.signed = integer, signed

    def start(self) -> list[Frame]:
        return [(self, "", 0)]  # grammar state, digits in the current part

    def step(self, frame: Frame, ch: str) -> list:
        _, state, digits = frame
        nxt = self._next(state, ch, digits)
        if nxt is None:
            return []
        digits = (digits + 1 if nxt == state else 1) if ch in "0123456789" else 0  # digits of the current part
        return [((self, nxt, digits), None, True)]

    def _next(self, state: str, ch: str, digits: int) -> str | None:
        digit = ch in "0123456789"
        if state in ("", "sign"):
            if digit:
                return "zero" if ch == "0" else "int"
            return "sign" if state == "" and ch == "-" and self.signed else None
        if digit:
            if state in ("int", "frac", "exp_digits"):
                return state if digits < (3 if state == "exp_digits" else MAX_DIGITS) else None
            return {"dot": "frac", "exp": "exp_digits", "exp_sign": "exp_digits"}.get(state)
        if self.integer:
            return None
        if state in ("zero", "int") and ch == ".":
            return "dot"
        if state in ("zero", "int", "frac") and ch in "eE":
            return "exp"
        if state == "exp" and ch in "+-":
            return "exp_sign"
        return None

    def can_end(self, frame: Frame) -> bool:
        return frame[1] in ("zero", "int", "frac", "exp_digits")

    def closed(self, frame: Frame) -> bool:
        return False


def _space(frame: Frame, ch: str, at: int) -> list:
    """Whitespace between a container's tokens, as llama.cpp's grammars take it: one space, or a
    newline and up to MAX_INDENT spaces or tabs (frame[at]: 0 none yet, -1 a space, k a newline and
    k-1 indents). A small model given more freedom drifts into odd layouts and can pad forever."""
    n = frame[at]
    if n == 0 and ch in " \n":
        n = -1 if ch == " " else 1
    elif n > 0 and ch in " \t" and n <= MAX_INDENT:
        n += 1
    else:
        return []
    return [(frame[:at] + (n,) + frame[at + 1:], None, True)]


class Array(Node):
    """`[...]` of `items` (after the `prefixItems`), min_items..max_items long."""

    __slots__ = ("prefix", "items", "min_items", "max_items")

    OPEN, FIRST, NEXT, VALUE, DONE = range(5)

    def __init__(self, items: Node | None, prefix: list[Node] | None = None, min_items: int = 0,
                 max_items: int | None = None) -> None:
        self.prefix, self.items = prefix or [], items
        self.min_items = min_items
        # past the prefix with no `items`, nothing more may come
        limit = len(self.prefix) if items is None else None
        self.max_items = max_items if limit is None else (limit if max_items is None else min(limit, max_items))

    def start(self) -> list[Frame]:
        return [(self, self.OPEN, 0, 0)]  # phase, items so far, spaces

    def _item(self, i: int) -> Node:
        return self.prefix[i] if i < len(self.prefix) else self.items  # type: ignore[return-value]

    def _more(self, n: int) -> bool:
        return self.max_items is None or n < self.max_items

    def step(self, frame: Frame, ch: str) -> list:
        _, phase, n, _spaces = frame
        if phase == self.OPEN:
            return [((self, self.FIRST, 0, 0), None, True)] if ch == "[" else []
        if phase == self.DONE:
            return []
        if ch in WHITESPACE:
            return _space(frame, ch, 3)
        out: list = []
        if phase in (self.FIRST, self.NEXT) and ch == "]" and n >= self.min_items:
            out.append(((self, self.DONE, n, 0), None, True))
        if phase == self.NEXT and ch == "," and self._more(n):
            out.append(((self, self.VALUE, n, 0), None, True))
        if phase in (self.FIRST, self.VALUE) and ch != "]" and self._more(n):
            out.append(((self, self.NEXT, n + 1, 0), self._item(n), False))
        return out

    def can_end(self, frame: Frame) -> bool:
        return frame[1] == self.DONE


class Object(Node):
    """`{...}` with the `properties` (keys as they are written in JSON, escapes and all), each at
    most once, the `required` ones before it closes, other keys only where `extra` (the
    additionalProperties schema) says what their values are."""

    __slots__ = ("props", "required", "extra")

    OPEN, FIRST, KEY_START, KEY, COLON, VALUE, NEXT, DONE = range(8)

    def __init__(self, props: dict[str, Node], required: frozenset[str], extra: Node | None) -> None:
        self.props, self.required, self.extra = props, required, extra

    def start(self) -> list[Frame]:
        # phase, keys used, the key being read, escape, \u digits left, spaces
        return [(self, self.OPEN, frozenset(), "", False, 0, 0)]

    def _keys_left(self, used: frozenset[str]) -> bool:
        return self.extra is not None or any(k not in used for k in self.props)

    def _key_may_go_on(self, key: str, used: frozenset[str]) -> bool:
        return self.extra is not None or any(k.startswith(key) and k not in used for k in self.props)

    def step(self, frame: Frame, ch: str) -> list:
        _, phase, used, key, escape, hex_left, _spaces = frame
        if phase == self.OPEN:
            return [((self, self.FIRST, used, "", False, 0, 0), None, True)] if ch == "{" else []
        if phase == self.DONE:
            return []
        if phase == self.KEY:
            return self._key_char(frame, ch)
        if ch in WHITESPACE:
            return _space(frame, ch, 6)
        if phase == self.COLON:
            return [((self, self.VALUE, used, key, False, 0, 0), None, True)] if ch == ":" else []
        if phase == self.VALUE:
            child = self.props.get(key, self.extra)
            return [((self, self.NEXT, used, "", False, 0, 0), child, False)]
        closes = ch == "}" and self.required <= used and phase in (self.FIRST, self.NEXT)
        if closes:
            return [((self, self.DONE, used, "", False, 0, 0), None, True)]
        if ch == "," and phase == self.NEXT and self._keys_left(used):
            return [((self, self.KEY_START, used, "", False, 0, 0), None, True)]
        if ch == '"' and phase in (self.FIRST, self.KEY_START) and self._keys_left(used):
            return [((self, self.KEY, used, "", False, 0, 0), None, True)]
        return []

    def _key_char(self, frame: Frame, ch: str) -> list:
        _, _, used, key, escape, hex_left, _ = frame
        if ch == '"' and not escape and not hex_left:
            if key in used or (key not in self.props and self.extra is None):
                return []
            return [((self, self.COLON, used | {key}, key, False, 0, 0), None, True)]
        if hex_left:
            ok, escape, hex_left = ch in HEX, False, hex_left - 1
        elif escape:
            ok, escape, hex_left = ch in ESCAPES, False, 4 if ch == "u" else 0
        else:
            ok, escape = ch >= " ", ch == "\\"
        if not ok or not self._key_may_go_on(key + ch, used):
            return []
        return [((self, self.KEY, used, key + ch, escape, hex_left, 0), None, True)]

    def can_end(self, frame: Frame) -> bool:
        return frame[1] == self.DONE


class Union(Node):
    """Any one of `options` (they are never a frame themselves: their frames start side by side)."""

    __slots__ = ("options",)

    def __init__(self, options: list[Node]) -> None:
        self.options = options

    def start(self) -> list[Frame]:
        return [f for o in self.options for f in o.start()]


class Ref(Node):
    """A `$ref`, compiled once its target is known (recursive schemas refer to themselves)."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: Node | None = None

    def start(self) -> list[Frame]:
        assert self.target is not None
        return self.target.start()


class AnyValue(Node):
    """Any JSON value (the schema `{}` or `true`)."""

    __slots__ = ("options",)

    def __init__(self) -> None:
        self.options = [Object({}, frozenset(), self), Array(self), String(), Number(),
                        Literal(True), Literal(False), Literal(None)]

    def start(self) -> list[Frame]:
        return [f for o in self.options for f in o.start()]


ANY = AnyValue()


def _advance(stack: Stack, ch: str, out: list[Stack]) -> None:
    """Every stack `stack` becomes after `ch` (none where `ch` cannot come next)."""
    frame, parent, depth = stack
    node = frame[0]
    for new, child, used in node.step(frame, ch):
        s = (new, parent, depth)
        if child is None:
            out.append(s) if used else _advance(s, ch, out)
        elif depth < MAX_DEPTH:
            for first in child.start():
                _advance((first, s, depth + 1), ch, out)
    if parent is not None and node.can_end(frame):  # the value may end here: its container takes `ch`
        _advance(parent, ch, out)


class SchemaPrefix:
    """Whether a text is a prefix of a JSON value that the compiled schema accepts; fed piece by
    piece (the interface of constrain.JsonPrefix). The value starts at the first character, as in
    llama.cpp's grammars: no whitespace before it."""

    __slots__ = ("stacks",)

    def __init__(self, root: Node) -> None:
        self.stacks: list[Stack] = [(f, None, 0) for f in root.start()]

    def copy(self) -> "SchemaPrefix":
        other = SchemaPrefix.__new__(SchemaPrefix)
        other.stacks = self.stacks  # stacks are immutable: shared
        return other

    def feed(self, text: str) -> bool:
        for ch in text:
            out: list[Stack] = []
            for s in self.stacks:
                _advance(s, ch, out)
            if not out:
                return False
            self.stacks = list(dict.fromkeys(out))[:MAX_STATES]
        return True

    @property
    def can_end(self) -> bool:
        """The text so far is a whole value (a number at the top could still go on)."""
        return any(p is None and f[0].can_end(f) for f, p, _ in self.stacks)

    @property
    def complete(self) -> bool:
        """The value is whole and nothing more could follow it."""
        return any(p is None and f[0].closed(f) for f, p, _ in self.stacks)


def compile_schema(schema: Any) -> Node:
    """The matcher of `schema`; SchemaError (saying where) for what it cannot follow."""
    try:
        return _Compiler(schema).build()
    except RecursionError:
        raise SchemaError("the schema is nested too deeply") from None


SHAPE_KEYS = ("properties", "additionalProperties", "items", "prefixItems", "minLength", "maxLength")


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Ref] = {}
        self.pending: list[str] = []

    def build(self) -> Node:
        node = self.node(self.root, "#")
        while self.pending:  # compile every target now, so a bad one is an error before any answer
            path = self.pending.pop()
            self.refs[path].target = self.node(self.resolve(path), path)
        return node

    def resolve(self, path: str) -> Any:
        if not path.startswith("#"):
            raise SchemaError(f"$ref {path!r}: only references into the schema itself (#/...) are followed")
        target = self.root
        for part in [p for p in path[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"$ref {path!r} points at nothing")
        return target

    def node(self, s: Any, where: str) -> Node:
        if s is True or s == {}:
            return ANY
        if s is False:
            raise SchemaError(f"{where}: the schema false accepts no value")
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object")
        if "$ref" in s:
            path = s["$ref"]
            if not isinstance(path, str):
                raise SchemaError(f"{where}: $ref must be a string")
            if path not in self.refs:
                self.refs[path] = Ref()
                self.pending.append(path)
            return self.refs[path]
        node = self._shape(s, where)
        if s.get("nullable") is True:
            node = Union([node, Literal(None)])
        return node

    def _shape(self, s: dict[str, Any], where: str) -> Node:
        if "const" in s:
            return Literal(s["const"])
        if "enum" in s:
            values = s["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}/enum: must be a non-empty list")
            return Union([Literal(v) for v in values])
        for key in ("anyOf", "oneOf"):  # oneOf's "exactly one" is not checked: any that matches
            if key in s:
                options = s[key]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{where}/{key}: must be a non-empty list")
                return Union([self.node(o, f"{where}/{key}/{i}") for i, o in enumerate(options)])
        if "allOf" in s:
            return self.node(self._merge(s, where), where)
        types = s.get("type")
        if types is None:
            types = ("object" if "properties" in s or "additionalProperties" in s else
                     "array" if "items" in s or "prefixItems" in s else
                     "string" if "minLength" in s or "maxLength" in s else None)
            if types is None:
                return ANY
        if isinstance(types, list):
            if not types:
                raise SchemaError(f"{where}/type: must not be empty")
            return Union([self._typed(t, s, where) for t in types])
        return self._typed(types, s, where)

    def _merge(self, s: dict[str, Any], where: str) -> dict[str, Any]:
        """allOf as one schema: the parts' properties and required keys together (Pydantic wraps a
        single $ref this way)."""
        parts = s["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"{where}/allOf: must be a non-empty list")
        merged = {k: v for k, v in s.items() if k != "allOf"}
        if not isinstance(merged.get("properties", {}), dict) or not isinstance(merged.get("required", []), list):
            raise SchemaError(f"{where}: properties must be an object and required a list")
        for i, part in enumerate(parts):
            seen = set()
            while isinstance(part, dict) and "$ref" in part and part["$ref"] not in seen:
                seen.add(part["$ref"])
                part = self.resolve(part["$ref"])
            if not isinstance(part, dict):
                raise SchemaError(f"{where}/allOf/{i}: a schema must be an object")
            if "allOf" in part:
                part = self._merge(part, f"{where}/allOf/{i}")
            if not isinstance(part.get("properties", {}), dict) or not isinstance(part.get("required", []), list):
                raise SchemaError(f"{where}/allOf/{i}: properties must be an object and required a list")
            for k, v in part.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required":
                    merged["required"] = sorted(set(merged.get("required", [])) | set(v))
                else:
                    merged.setdefault(k, v)
        return merged

    def _count(self, s: dict[str, Any], key: str, where: str) -> int | None:
        v = s.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SchemaError(f"{where}/{key}: must be a whole number >= 0")
        return v

    def _typed(self, t: Any, s: dict[str, Any], where: str) -> Node:
        if t == "string":
            return String(self._count(s, "minLength", where) or 0, self._count(s, "maxLength", where))
        if t in ("integer", "number"):
            low = [s[k] for k in ("minimum", "exclusiveMinimum") if isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)]
            return Number(integer=t == "integer", signed=not (low and max(low) >= 0))
        if t == "boolean":
            return Union([Literal(True), Literal(False)])
        if t == "null":
            return Literal(None)
        if t == "array":
            return self._array(s, where)
        if t == "object":
            return self._object(s, where)
        raise SchemaError(f"{where}/type: unknown type {t!r}")

    def _array(self, s: dict[str, Any], where: str) -> Node:
        items, prefix = s.get("items", True), s.get("prefixItems")
        if isinstance(items, list):  # the older tuple form
            prefix, items = items, s.get("additionalItems", True)
        if prefix is not None and not isinstance(prefix, list):
            raise SchemaError(f"{where}/prefixItems: must be a list of schemas")
        prefix_nodes = [self.node(p, f"{where}/prefixItems/{i}") for i, p in enumerate(prefix or [])]
        item_node = None if items is False else self.node(items, f"{where}/items")
        return Array(item_node, prefix_nodes, self._count(s, "minItems", where) or 0, self._count(s, "maxItems", where))

    def _object(self, s: dict[str, Any], where: str) -> Node:
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            raise SchemaError(f"{where}/properties: must be an object")
        required = s.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}/required: must be a list of names")
        extra_schema = s.get("additionalProperties")
        if extra_schema is None:  # llama.cpp's reading: declared properties only, any keys where none are declared
            extra_schema = not props
        extra = None if extra_schema is False else self.node(extra_schema, f"{where}/additionalProperties")
        missing = [r for r in required if r not in props and extra is None]
        if missing:
            raise SchemaError(f"{where}/required: {missing[0]!r} is required but not allowed")
        written = {_key(k): self.node(v, f"{where}/properties/{k}") for k, v in props.items()}
        return Object(written, frozenset(_key(r) for r in required), extra)


def _key(name: str) -> str:
    """A property name as it is written between the quotes of a JSON key."""
    return json.dumps(name, ensure_ascii=False)[1:-1]
