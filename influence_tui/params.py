"""GenerationParams: the one set of sampling knobs shared by the CLI, env, TUI, `/set` and every API.

Each API dialect maps its own field names onto this dataclass in one place; validation lives here
so that every client gets the same one-line error for the same bad value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


class ParamError(ValueError):
    """A generation parameter is out of range or of the wrong type (message is user-facing)."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int | None = None  # None / 0 = off
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def with_(self, **changes: Any) -> "GenerationParams":
        """A copy with some fields changed (re-validated); `None` values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "stop" in changes:
            changes["stop"] = normalize_stop(changes["stop"])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


PARAM_NAMES = tuple(f.name for f in fields(GenerationParams))

# name -> (type, min, max) for numbers; used by validate() and by `/set` and the Settings screen.
RANGES: dict[str, tuple[type, float | None, float | None]] = {
    "max_tokens": (int, 1, 1_000_000),
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1_000_000),
    "min_p": (float, 0.0, 1.0),
    "repeat_penalty": (float, 0.0, 10.0),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "repeat_last_n": (int, 0, 1_000_000),
    "seed": (int, None, None),
}


def normalize_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise ParamError("stop must be a string or a list of strings")


def _number(value: float, kind: type) -> str:
    # "{:g}" would print 1_000_000 as "1e+06"; users type plain digits, so show them plain digits.
    if kind is int or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def describe_range(name: str) -> str:
    kind, lo, hi = RANGES[name]
    word = "an integer" if kind is int else "a number"
    if lo is None or hi is None:
        return word
    return f"{word} from {_number(lo, kind)} to {_number(hi, kind)}"


def coerce(name: str, value: Any) -> Any:
    """Turn a user value (str from env / `/set` / a form, or JSON) into the field's type, or raise ParamError."""
    if name not in RANGES:
        raise ParamError(f"unknown parameter {name!r}")
    kind, lo, hi = RANGES[name]
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if name in ("top_k", "seed"):
            return None
        raise ParamError(f"{name} needs a value: {describe_range(name)}")
    if isinstance(value, bool):
        raise ParamError(f"{name}={value!r} is not valid: expected {describe_range(name)}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out: Any = int(value) if not isinstance(value, str) else int(value.strip())
        else:
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
    except (TypeError, ValueError):
        raise ParamError(f"{name}={value!r} is not valid: expected {describe_range(name)}") from None
    if name == "seed" and out == -1:  # llama.cpp's and Ollama's "random" (Open WebUI sends it)
        return None
    if name == "repeat_last_n" and out == -1:  # Ollama's "the whole context": no window can be longer
        return hi
    if lo is not None and not (lo <= out <= hi):
        raise ParamError(f"{name}={value!r} is out of range: expected {describe_range(name)}")
    if name == "top_k" and out == 0:
        return None
    return out


def validate(p: GenerationParams) -> None:
    for name in RANGES:
        value = getattr(p, name)
        if value is None and name in ("top_k", "seed"):
            continue
        coerced = coerce(name, value)
        if name not in ("top_k", "seed") and coerced != value:
            raise ParamError(f"{name}={value!r} is not valid: expected {describe_range(name)}")
    if not isinstance(p.stop, tuple) or not all(isinstance(s, str) for s in p.stop):
        raise ParamError("stop must be a list of strings")


def params_from_mapping(data: dict[str, Any], base: GenerationParams | None = None) -> GenerationParams:
    """Build params from a mapping of our own field names (values coerced and validated)."""
    base = base or GenerationParams()
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "stop":
            changes["stop"] = normalize_stop(value)
        elif key == "ignore_eos":
            if not isinstance(value, bool):  # bool("false") is True
                raise ParamError("ignore_eos must be true or false")
            changes["ignore_eos"] = value
        elif key in RANGES:
            changes[key] = coerce(key, value)
    return replace(base, **changes)
