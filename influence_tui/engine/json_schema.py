"""Structured outputs: answers that follow a JSON schema (Ollama's `format: {schema}`, OpenAI's
`response_format: {"type": "json_schema", ...}`, `influence generate --format schema.json`).

The schema is compiled once into a small tree of matchers (object, array, string, number, a set of
exact texts, union). Text is recognized character by character as a set of parse stacks, each a
linked tuple of immutable frames, so trying a candidate token copies nothing (constrain.JsonSampler
tries a few per step) and a union (`anyOf`, a type list) is simply several stacks until a character
tells them apart. An `enum` is one matcher however long (a sorted list of its texts).

What a schema constrains, as llama.cpp's json-schema-to-grammar does (the converter Ollama uses):
`type` (one or a list), `properties` / `required` / `additionalProperties` (an object with
`properties` takes only those keys unless `additionalProperties` says otherwise; keys may come in
any order, each once, the required ones before it closes), `propertyNames` given as an `enum`
(Pydantic's `dict[Literal[...], V]`), `items` / `prefixItems` / `minItems` / `maxItems`, `enum`,
`const`, `anyOf` / `oneOf` / `allOf` (with the keywords beside them), `$ref` into the schema
(`$defs`, `definitions`: Pydantic's nested models, recursion included), `nullable`, a string's
`minLength` / `maxLength`, a string's `pattern` (regular expressions, matched as they are written)
and `format` date, time, date-time and uuid (Pydantic's datetime, date, time and UUID fields), and
a number's sign (`minimum` >= 0 takes no minus). Not enforced: other formats (email, uri, …),
`patternProperties`, `not`, `uniqueItems`, `minProperties` / `maxProperties`, numeric bounds other
than the sign.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left, bisect_right
from typing import Any

from influence_tui.engine.constrain import ESCAPES, HEX, WHITESPACE

MAX_DIGITS = 20  # digits of a number's integer or fraction part: a 64-bit integer, a float's repr; no runaway
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


def _escape(pending: str, ch: str) -> str | None:
    """One more character of a string's escape sequence `pending` (it starts with the backslash):
    None where JSON has no such escape, "" once it is whole, else what is still pending. A \\u
    high surrogate must be followed by its low half (a lone one is not valid Unicode: Pydantic's
    parser refuses it)."""
    n = len(pending)
    if n == 1:
        return "" if ch in ESCAPES and ch != "u" else pending + ch if ch == "u" else None
    if n in (7,):  # after a high surrogate: its pair's backslash, then 'u'
        return pending + ch if ch == "u" else None
    if n == 6:
        return pending + ch if ch == "\\" else None
    if ch not in HEX:
        return None
    pending += ch
    if len(pending) == 6:
        code = int(pending[2:], 16)
        if 0xDC00 <= code <= 0xDFFF:
            return None
        return pending if 0xD800 <= code <= 0xDBFF else ""
    if len(pending) == 12:
        return "" if 0xDC00 <= int(pending[8:], 16) <= 0xDFFF else None
    return pending


class Choice(Node):
    """One of a set of exact texts (`enum`, `const`, true / false / null), kept sorted so that a
    prefix is checked by bisection, whatever the number of members."""

    __slots__ = ("texts", "whole")

    def __init__(self, texts: list[str]) -> None:
        self.texts = sorted(set(texts))
        self.whole = frozenset(self.texts)

    def start(self) -> list[Frame]:
        return [(self, "")]

    def step(self, frame: Frame, ch: str) -> list:
        typed = frame[1] + ch
        i = bisect_left(self.texts, typed)
        return [((self, typed), None, True)] if i < len(self.texts) and self.texts[i].startswith(typed) else []

    def can_end(self, frame: Frame) -> bool:
        return frame[1] in self.whole

    def closed(self, frame: Frame) -> bool:
        typed = frame[1]
        i = bisect_right(self.texts, typed)
        return typed in self.whole and not (i < len(self.texts) and self.texts[i].startswith(typed))


def _texts(value: Any, where: str) -> list[str]:
    """The ways a scalar is written: a string with or without \\u escapes, an integral number with
    or without ".0" (JSON Schema's 1 equals 1.0)."""
    if isinstance(value, str):
        return [json.dumps(value, ensure_ascii=False), json.dumps(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError(f"{where}: {value} is not a JSON value")
        return [json.dumps(value)] + ([str(int(value))] if value.is_integer() else [])
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value), f"{value}.0"]
    return [json.dumps(value)]  # true, false, null


def literal(value: Any) -> Node:
    return Choice(_texts(value, "#"))


class String(Node):
    """A JSON string of min_len..max_len characters (an escape is one, a surrogate pair too)."""

    __slots__ = ("min_len", "max_len")

    def __init__(self, min_len: int = 0, max_len: int | None = None) -> None:
        self.min_len, self.max_len = min_len, max_len

    def start(self) -> list[Frame]:
        return [(self, 0, 0, "")]  # phase (0 before, 1 inside, 2 done), length, the escape under way

    def step(self, frame: Frame, ch: str) -> list:
        _, phase, n, pending = frame
        if phase == 0:
            return [((self, 1, 0, ""), None, True)] if ch == '"' else []
        if phase == 2:
            return []
        if pending:
            after = _escape(pending, ch)
            return [] if after is None else [((self, 1, n, after), None, True)]
        if ch == '"':
            return [((self, 2, n, ""), None, True)] if n >= self.min_len else []
        if ch < " " or (self.max_len is not None and n >= self.max_len):  # control characters must be escaped
            return []
        return [((self, 1, n + 1, "\\" if ch == "\\" else ""), None, True)]

    def can_end(self, frame: Frame) -> bool:
        return frame[1] == 2


# `format`s a Pydantic model writes, as the regular expressions of their values (llama.cpp's
# converter knows the same four); other formats (email, uri, …) are any string
_DATE = (r"[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"  # each month's days
         r"|02-(0[1-9]|1[0-9]|2[0-9]))")  # (February 29th in any year)
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])?"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}


class PatternString(Node):
    """A JSON string whose value matches a regular expression (a `pattern`, or a `format` such as
    date-time), checked as it is written: each character must leave a match possible (the `regex`
    module's partial matching). Its characters are written as they are: no escapes."""

    __slots__ = ("regex", "min_len", "max_len")

    def __init__(self, compiled: Any, min_len: int = 0, max_len: int | None = None) -> None:
        self.regex, self.min_len, self.max_len = compiled, min_len, max_len

    def start(self) -> list[Frame]:
        return [(self, 0, "")]  # phase (0 before, 1 inside, 2 done), the value so far

    def step(self, frame: Frame, ch: str) -> list:
        _, phase, value = frame
        if phase == 0:
            return [((self, 1, ""), None, True)] if ch == '"' else []
        if phase == 2:
            return []
        if ch == '"':
            whole = len(value) >= self.min_len and self.regex.fullmatch(value) is not None
            return [((self, 2, value), None, True)] if whole else []
        if ch == "\\" or ch < " " or (self.max_len is not None and len(value) >= self.max_len):
            return []
        value += ch
        return [((self, 1, value), None, True)] if self.regex.fullmatch(value, partial=True) is not None else []

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
    """`{...}` with the `properties`, each at most once, the `required` ones before it closes, other
    keys only where `extra` (the additionalProperties schema) says what their values are. Keys are
    compared once decoded ("a\\u0062" is "ab"); a declared key is only recognized as JSON writes it."""

    __slots__ = ("props", "written", "required", "extra")

    OPEN, FIRST, KEY_START, KEY, COLON, VALUE, NEXT, DONE = range(8)

    def __init__(self, props: dict[str, Node], required: frozenset[str], extra: Node | None) -> None:
        self.props, self.required, self.extra = props, required, extra
        self.written = {_key(k): k for k in props}  # as the key reads between its quotes -> its name

    def start(self) -> list[Frame]:
        # phase, names used, the key being read (raw; once read, its name), the escape under way, spaces
        return [(self, self.OPEN, frozenset(), "", "", 0)]

    def _keys_left(self, used: frozenset[str]) -> bool:
        return self.extra is not None or any(k not in used for k in self.props)

    def _key_may_go_on(self, raw: str, used: frozenset[str]) -> bool:
        return self.extra is not None or any(w.startswith(raw) and k not in used for w, k in self.written.items())

    def step(self, frame: Frame, ch: str) -> list:
        _, phase, used, key, _pending, _spaces = frame
        if phase == self.OPEN:
            return [((self, self.FIRST, used, "", "", 0), None, True)] if ch == "{" else []
        if phase == self.DONE:
            return []
        if phase == self.KEY:
            return self._key_char(frame, ch)
        if ch in WHITESPACE:
            return _space(frame, ch, 5)
        if phase == self.COLON:
            return [((self, self.VALUE, used, key, "", 0), None, True)] if ch == ":" else []
        if phase == self.VALUE:
            child = self.props.get(key, self.extra)
            return [((self, self.NEXT, used, "", "", 0), child, False)]
        if ch == "}" and self.required <= used and phase in (self.FIRST, self.NEXT):
            return [((self, self.DONE, used, "", "", 0), None, True)]
        if ch == "," and phase == self.NEXT and self._keys_left(used):
            return [((self, self.KEY_START, used, "", "", 0), None, True)]
        if ch == '"' and phase in (self.FIRST, self.KEY_START) and self._keys_left(used):
            return [((self, self.KEY, used, "", "", 0), None, True)]
        return []

    def _key_char(self, frame: Frame, ch: str) -> list:
        _, _, used, key, pending, _ = frame
        if ch == '"' and not pending:
            name = json.loads(f'"{key}"')
            if name in used or (name not in self.props and self.extra is None):
                return []
            return [((self, self.COLON, used | {name}, name, "", 0), None, True)]
        if pending:
            after = _escape(pending, ch)
        else:
            after = "\\" if ch == "\\" else "" if ch >= " " else None
        if after is None or not self._key_may_go_on(key + ch, used):
            return []
        return [((self, self.KEY, used, key + ch, after, 0), None, True)]

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

    __slots__ = ("target", "busy")

    def __init__(self) -> None:
        self.target: Node | None = None
        self.busy = False

    def start(self) -> list[Frame]:
        """The target's first frames; none where the target comes back to this reference before
        reading a character (`{"anyOf": [{"$ref": "#"}]}` would otherwise recurse forever)."""
        if self.busy or self.target is None:
            return []
        self.busy = True
        try:
            return self.target.start()
        finally:
            self.busy = False


class AnyValue(Node):
    """Any JSON value (the schema `{}` or `true`)."""

    __slots__ = ("options",)

    def __init__(self) -> None:
        self.options = [Object({}, frozenset(), self), Array(self), String(), Number(), Choice(["true", "false", "null"])]

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
            try:
                for s in self.stacks:
                    _advance(s, ch, out)
            except RecursionError:  # (MAX_DEPTH keeps well inside Python's limit; never fail a batch)
                return False
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
        node = _Compiler(schema).build()
    except RecursionError:
        raise SchemaError("the schema is nested too deeply") from None
    if not node.start():
        raise SchemaError("#: the schema accepts no value (it refers only to itself)")
    return node


# keywords that describe rather than constrain: the first of them wins where allOf parts differ
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$defs", "definitions", "discriminator", "strict"})
LOWER_BOUNDS = ("minLength", "minItems", "minimum", "exclusiveMinimum")
UPPER_BOUNDS = ("maxLength", "maxItems", "maximum", "exclusiveMaximum")


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Ref] = {}
        self.pending: list[str] = []

    def build(self) -> Node:
        node = self.node(self.root, "#")
        while self.pending:  # compile every target now, so a bad one is an error before any answer
            path = self.pending.pop()
            self.refs[path].target = self.node(self.resolve(path, path), path)
        return node

    def resolve(self, path: Any, where: str) -> Any:
        if not isinstance(path, str):
            raise SchemaError(f"{where}: $ref must be a string")
        if not path.startswith("#"):
            raise SchemaError(f"$ref {path!r}: only references into the schema itself (#/...) are followed")
        target = self.root
        for part in [p for p in path[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isascii() and part.isdigit() and int(part) < len(target):
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
            self.resolve(path, where)  # (an error now, saying where it was written)
            if path not in self.refs:
                self.refs[path] = Ref()
                self.pending.append(path)
            node: Node = self.refs[path]
        else:
            node = self._shape(s, where)
        if s.get("nullable") is True:
            node = Union([node, literal(None)])
        return node

    def _values(self, values: list[Any], where: str) -> Node:
        """`enum` / `const`: the scalars as one Choice, objects and arrays as their shapes."""
        scalars = [t for v in values if not isinstance(v, (dict, list)) for t in _texts(v, where)]
        shapes = [self._const_shape(v, where) for v in values if isinstance(v, (dict, list))]
        nodes = ([Choice(scalars)] if scalars else []) + shapes
        return nodes[0] if len(nodes) == 1 else Union(nodes)

    def _const_shape(self, value: Any, where: str) -> Node:
        if isinstance(value, dict):
            props = {k: self._values([v], where) for k, v in value.items()}
            return Object(props, frozenset(props), None)
        items = [self._values([v], where) for v in value]
        return Array(None, items, len(items), len(items))

    def _shape(self, s: dict[str, Any], where: str) -> Node:
        if "const" in s:
            return self._values([s["const"]], f"{where}/const")
        if "enum" in s:
            values = s["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}/enum: must be a non-empty list")
            return self._values(values, f"{where}/enum")
        if "allOf" in s:
            return self.node(self._merge(s, where), where)
        for key in ("anyOf", "oneOf"):  # oneOf's "exactly one" is not checked: any that matches
            if key in s:
                return self._union(s, key, where)
        types = s.get("type")
        if types is None:
            types = ("object" if "properties" in s or "additionalProperties" in s or "propertyNames" in s else
                     "array" if "items" in s or "prefixItems" in s else
                     "string" if "minLength" in s or "maxLength" in s else None)
            if types is None:
                return ANY
        if isinstance(types, list):
            if not types:
                raise SchemaError(f"{where}/type: must not be empty")
            return Union([self._typed(t, s, where) for t in types])
        return self._typed(types, s, where)

    def _union(self, s: dict[str, Any], key: str, where: str) -> Node:
        options = s[key]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{where}/{key}: must be a non-empty list")
        beside = {k: v for k, v in s.items() if k != key and k not in ANNOTATIONS}
        if beside.get("nullable") is True:  # (node() adds null once for the whole union)
            del beside["nullable"]
        nodes = []
        for i, option in enumerate(options):
            here = f"{where}/{key}/{i}"
            # keywords beside the union hold for each option: {"type": "object", "anyOf": [{"required": ["a"]}, ...]}
            nodes.append(self.node(self._merge({"allOf": [beside, option]}, here), here) if beside else self.node(option, here))
        return Union(nodes)

    def _merge(self, s: dict[str, Any], where: str) -> dict[str, Any]:
        """allOf as one schema: properties and required keys together (a property in several parts
        must fit each), the tighter of two bounds, the types they share; other keywords must agree.
        (Pydantic wraps a single $ref this way.)"""
        parts = s["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"{where}/allOf: must be a non-empty list")
        merged: dict[str, Any] = {}
        base = {k: v for k, v in s.items() if k != "allOf"}
        for i, part in enumerate([base, *parts]):
            here = f"{where}/allOf/{i - 1}" if i else where
            for piece in self._pieces(part, here, set()):
                self._merge_into(merged, self._merge(piece, here) if "allOf" in piece else piece, here)
        return merged

    def _pieces(self, part: Any, where: str, seen: set[str]) -> list[dict[str, Any]]:
        """An allOf part as schemas to merge: a $ref's target, then the keywords beside it."""
        if part is True or part == {}:
            return []
        if not isinstance(part, dict):
            raise SchemaError(f"{where}: a schema must be an object")
        if "$ref" not in part:
            return [part]
        ref = part["$ref"]
        if not isinstance(ref, str) or ref in seen:
            raise SchemaError(f"{where}: $ref must be a string that leads to a schema")
        rest = {k: v for k, v in part.items() if k != "$ref"}
        return self._pieces(self.resolve(ref, where), where, seen | {ref}) + ([rest] if rest else [])

    def _merge_into(self, merged: dict[str, Any], part: dict[str, Any], where: str) -> None:
        props, required = part.get("properties", {}), part.get("required", [])
        if not isinstance(props, dict):
            raise SchemaError(f"{where}/properties: must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}/required: must be a list of names")
        for k, v in part.items():
            if k in ANNOTATIONS or k not in merged:
                merged.setdefault(k, dict(v) if k == "properties" else v)
            elif merged[k] == v:
                continue
            elif k == "properties":
                for name, sub in v.items():
                    old = merged[k].get(name)
                    merged[k][name] = sub if old is None else {"allOf": [old, sub]}
            elif k == "required":
                merged[k] = sorted(set(merged[k]) | set(v))
            elif k in LOWER_BOUNDS + UPPER_BOUNDS and all(isinstance(x, (int, float)) for x in (merged[k], v)):
                merged[k] = max(merged[k], v) if k in LOWER_BOUNDS else min(merged[k], v)
            elif k == "type":
                ours, theirs = ([t] if isinstance(t, str) else t for t in (merged[k], v))
                both = [t for t in ours if t in theirs] if isinstance(ours, list) and isinstance(theirs, list) else []
                if not both:
                    raise SchemaError(f"{where}/type: no value is both {merged[k]!r} and {v!r}")
                merged[k] = both
            else:
                raise SchemaError(f"{where}/{k}: allOf parts that set {k} differently are not supported")

    def _count(self, s: dict[str, Any], key: str, where: str) -> int | None:
        v = s.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SchemaError(f"{where}/{key}: must be a whole number >= 0")
        return v

    def _range(self, s: dict[str, Any], low: str, high: str, where: str) -> tuple[int, int | None]:
        lo, hi = self._count(s, low, where) or 0, self._count(s, high, where)
        if hi is not None and lo > hi:
            raise SchemaError(f"{where}: {low} {lo} is more than {high} {hi}: no value fits")
        return lo, hi

    def _typed(self, t: Any, s: dict[str, Any], where: str) -> Node:
        if t == "string":
            lo, hi = self._range(s, "minLength", "maxLength", where)
            compiled = self._pattern(s, where)
            return String(lo, hi) if compiled is None else PatternString(compiled, lo, hi)
        if t in ("integer", "number"):
            low = [s[k] for k in ("minimum", "exclusiveMinimum") if isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)]
            return Number(integer=t == "integer", signed=not (low and max(low) >= 0))
        if t == "boolean":
            return Choice(["true", "false"])
        if t == "null":
            return literal(None)
        if t == "array":
            return self._array(s, where)
        if t == "object":
            return self._object(s, where)
        raise SchemaError(f"{where}/type: unknown type {t!r}")

    def _pattern(self, s: dict[str, Any], where: str) -> Any:
        """A string's `pattern` (JSON Schema's: found anywhere in the value unless anchored with ^…$),
        else its `format` where it is one of FORMATS; None for any string."""
        import regex

        pattern = s.get("pattern")
        if pattern is None:
            fmt = s.get("format")
            return regex.compile(FORMATS[fmt]) if isinstance(fmt, str) and fmt in FORMATS else None
        if not isinstance(pattern, str):
            raise SchemaError(f"{where}/pattern: must be a string")
        anchored = pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")
        source = pattern if anchored else f"(?s:.*?)(?:{pattern})(?s:.*)"
        try:
            return regex.compile(source)
        except regex.error as exc:
            raise SchemaError(f"{where}/pattern: not a regular expression this server reads ({exc})") from None

    def _array(self, s: dict[str, Any], where: str) -> Node:
        items, prefix = s.get("items", True), s.get("prefixItems")
        if isinstance(items, list):  # the older tuple form
            prefix, items = items, s.get("additionalItems", True)
        if prefix is not None and not isinstance(prefix, list):
            raise SchemaError(f"{where}/prefixItems: must be a list of schemas")
        prefix_nodes = [self.node(p, f"{where}/prefixItems/{i}") for i, p in enumerate(prefix or [])]
        item_node = None if items is False else self.node(items, f"{where}/items")
        lo, hi = self._range(s, "minItems", "maxItems", where)
        if item_node is None and lo > len(prefix_nodes):
            raise SchemaError(f"{where}: minItems {lo} but only {len(prefix_nodes)} items are allowed")
        return Array(item_node, prefix_nodes, lo, hi)

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
        names = self._property_names(s, where)
        if names is not None:  # only these keys: each a property (the additional schema where undeclared)
            if extra_schema is not False:
                props = {**{n: extra_schema for n in names}, **props}
            extra_schema = False
        extra = None if extra_schema is False else self.node(extra_schema, f"{where}/additionalProperties")
        missing = [r for r in required if r not in props and extra is None]
        if missing:
            raise SchemaError(f"{where}/required: {missing[0]!r} is required but not allowed")
        compiled = {k: self.node(v, f"{where}/properties/{k}") for k, v in props.items()}
        return Object(compiled, frozenset(required), extra)

    def _property_names(self, s: dict[str, Any], where: str) -> list[str] | None:
        """`propertyNames` as an enum or const of names (Pydantic's dict[Literal[...], V] and
        dict[SomeEnum, V]); other forms are not enforced."""
        names = s.get("propertyNames")
        seen: set[str] = set()
        while isinstance(names, dict) and "$ref" in names and names["$ref"] not in seen:
            seen.add(names["$ref"])
            names = self.resolve(names["$ref"], f"{where}/propertyNames")
        if not isinstance(names, dict):
            return None
        values = names.get("enum", [names["const"]] if "const" in names else None)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        return values


def _key(name: str) -> str:
    """A property name as it is written between the quotes of a JSON key."""
    return json.dumps(name, ensure_ascii=False)[1:-1]
