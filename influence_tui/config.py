"""Settings: command-line flags > INFLUENCE_* environment > ./.env > user settings file > defaults.

Every setting of the original tool keeps its environment name. Each value remembers where it came
from so `influence config` can show it. An empty environment or .env value counts as not set; an
empty flag is a value (`--system ""` clears a system prompt set further down). A bad value raises `ConfigError` with one line naming the
variable, the value and what is allowed; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from influence_tui.params import GenerationParams, ParamError, coerce

DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(ValueError):
    """A setting has a bad value (message is one user-facing line)."""


def _param(name: str) -> Callable[[str], Any]:
    return lambda raw: coerce(name, raw)


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: Any) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ParamError(f"expected an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ParamError(f"expected an integer from {lo} to {hi}")
        return value

    return parse


def _device(raw: Any) -> str:
    value = str(raw).strip().lower()
    if value not in DEVICES:
        raise ParamError("expected one of " + ", ".join(DEVICES))
    return value


def _text(raw: Any) -> str | None:
    value = str(raw).strip()
    return value or None


def _auto_int(lo: int, hi: int) -> Callable[[Any], int | None]:
    """An integer from lo to hi, or auto (empty): the engine picks."""

    def parse(raw: Any) -> int | None:
        value = str(raw).strip().lower()
        if value in ("", "auto"):
            return None
        try:
            return _int_range(lo, hi)(value)
        except ParamError:
            raise ParamError(f"expected auto (empty) or an integer from {lo} to {hi}") from None

    return parse


_threads = _auto_int(1, 1024)
_context = _auto_int(64, 1_048_576)


def _host(raw: Any) -> str:
    value = str(raw).strip() or "127.0.0.1"
    # a host name, an IPv4 or IPv6 address: checked here, not when the server fails to bind
    if not re.fullmatch(r"[A-Za-z0-9._\-]+|\[?[0-9A-Fa-f:.]+(%[A-Za-z0-9_.\-]+)?\]?", value):  # Docker names, fe80::1%eth0
        raise ParamError("expected a host name or an IP address, e.g. 127.0.0.1 or 0.0.0.0")
    return value.strip("[]")


def _api_key(raw: Any) -> str | None:
    value = _text(raw)
    if value is not None and (not value.isascii() or any(ch.isspace() or not ch.isprintable() for ch in value)):
        raise ParamError("expected a key of ASCII characters without spaces (clients send it in an HTTP header)")
    return value


def _url(raw: Any) -> str | None:
    value = str(raw).strip().rstrip("/")
    if not value:
        return None
    if "://" not in value and re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?(/\S*)?", value):
        # a bare host (hf-mirror.com, as the mirror docs write it): https, but plain http for this
        # machine (a local mirror rarely has a certificate)
        local = re.match(r"(localhost|127\.\d+\.\d+\.\d+)(:|/|$)", value)
        value = ("http://" if local else "https://") + value
    if not value.startswith(("http://", "https://")):
        raise ParamError("expected an http:// or https:// URL, or a host name")
    return value


_ON_WORDS, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _switch(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in _ON_WORDS or word in _OFF:
        return word in _ON_WORDS
    raise ParamError("expected on or off (true/false, yes/no, 1/0)")


@dataclass(frozen=True)
class Spec:
    name: str  # attribute name
    env: str  # environment variable
    default: Any
    parse: Callable[[Any], Any]
    help: str


_D = GenerationParams()

SPECS: tuple[Spec, ...] = (
    Spec("model_path", "INFLUENCE_MODEL_PATH", None, _text, "model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)"),
    Spec("temperature", "INFLUENCE_TEMPERATURE", _D.temperature, _param("temperature"), "sampling temperature, 0-2 (0 = greedy)"),
    Spec("top_p", "INFLUENCE_TOP_P", _D.top_p, _param("top_p"), "nucleus sampling, 0-1"),
    Spec("top_k", "INFLUENCE_TOP_K", _D.top_k, _param("top_k"), "top-k sampling (empty = off)"),
    Spec("repeat_penalty", "INFLUENCE_REPEAT_PENALTY", _D.repeat_penalty, _param("repeat_penalty"), "repetition penalty (1 or 0 = off)"),
    Spec("max_tokens", "INFLUENCE_MAX_TOKENS", _D.max_tokens, _param("max_tokens"), "maximum tokens to generate"),
    Spec("min_p", "INFLUENCE_MIN_P", _D.min_p, _param("min_p"), "min-p sampling, 0-1 (0 = off)"),
    Spec("seed", "INFLUENCE_SEED", None, _param("seed"), "random seed (empty = random)"),
    Spec("system_prompt", "INFLUENCE_SYSTEM_PROMPT", None, _text, "system prompt for chat"),
    Spec("think", "INFLUENCE_THINK", True, _switch,
         "reasoning models think before they answer, their reasoning shown apart: on | off"),
    Spec("device", "INFLUENCE_DEVICE", "auto", _device, "auto | cpu | cuda | mps"),
    Spec("device_index", "INFLUENCE_DEVICE_INDEX", 0, _int_range(0, 64), "GPU index when several"),
    Spec("threads", "INFLUENCE_THREADS", None, _threads, "CPU threads for inference (empty = one per core)"),
    Spec("context_length", "INFLUENCE_CONTEXT_LENGTH", None, _context,
         "context per request, in tokens (empty = the model's, at most 4096)"),
    Spec("port", "INFLUENCE_PORT", 8080, _int_range(1, 65535), "API server port"),
    Spec("host", "INFLUENCE_HOST", "127.0.0.1", _host, "API server bind address"),
    Spec("api_key", "INFLUENCE_API_KEY", None, _api_key, "require 'Authorization: Bearer <key>' on the API"),
    Spec("warmup_tokens", "INFLUENCE_WARMUP_TOKENS", 6, _int_range(0, 1024), "tokens generated after load to warm up (0 = off)"),
    Spec("mirror", "INFLUENCE_MIRROR", None, _url, "Hugging Face Hub endpoint or mirror"),
    Spec("output_dir", "INFLUENCE_OUTPUT_DIR", "./models", lambda raw: _text(raw) or "./models", "where models are downloaded"),
    Spec("save_chats", "INFLUENCE_SAVE_CHATS", True, _switch,
         "keep the app's chats on this disk, to reopen from the Chats list (ctrl+o): on | off"),
    Spec("chats_dir", "INFLUENCE_CHATS_DIR", None, _text, "where the app keeps its chats (empty = the platform's data folder)"),
    Spec("theme", "INFLUENCE_THEME", "textual-dark", lambda raw: _text(raw) or "textual-dark", "the app's colour theme"),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}
SENSITIVE = {"api_key"}


def config_dir() -> Path:
    """The user's settings folder (INFLUENCE_CONFIG_DIR overrides, for tests and portable installs)."""
    override = os.environ.get("INFLUENCE_CONFIG_DIR")
    if override:
        return Path(override)
    from platformdirs import user_config_dir

    return Path(user_config_dir("influence-tui", appauthor=False))


def settings_file() -> Path:
    return config_dir() / "settings.json"


_OFF_WORDS = ("", *_OFF)


def env_flag(name: str, env: Mapping[str, str] | None = None, default: bool = False) -> bool:
    """A yes/no environment switch: "0", "false", "no", "off" (any case) mean off, other values on.

    Unset or empty gives `default`, so `NAME=` left in a shell or a script never turns a switch on.
    """
    raw = (os.environ if env is None else env).get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip().lower() not in _OFF_WORDS


# Environment-only numbers read by the downloader (hub.RetryPolicy): (type, min, max). Checked at
# load so a typo stops the program at once, not minutes later when a download first retries.
ENV_NUMBERS: dict[str, tuple[type, float, float]] = {
    "INFLUENCE_HUB_RETRIES": (int, 0, 1000),
    "INFLUENCE_HUB_BACKOFF": (float, 0.0, 3600.0),
    "INFLUENCE_HUB_TIMEOUT": (float, 0.1, 3600.0),  # 0 would time every request out at once
}


def env_number(name: str, env: Mapping[str, str] | None = None) -> int | float | None:
    """The value of an environment-only number; None when unset or empty; ConfigError when bad."""
    raw = (os.environ if env is None else env).get(name)
    if raw is None or not raw.strip():
        return None
    kind, lo, hi = ENV_NUMBERS[name]
    try:
        value = kind(raw.strip())
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:  # also rejects nan and inf
        word = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r} is not valid: expected {word} from {lo:g} to {hi:g}")
    return value


def check_cache_dir(env: Mapping[str, str] | None = None) -> None:
    """ConfigError when INFLUENCE_CACHE_DIR is, or lies under, a file (mkdir would fail later, naming no variable)."""
    raw = ((os.environ if env is None else env).get("INFLUENCE_CACHE_DIR") or "").strip()
    if not raw:  # empty = the platform's cache folder, as engine.tokenizer.cache_dir reads it
        return
    path = Path(raw).expanduser()
    for candidate in (path, *path.parents):
        try:
            if not candidate.exists():
                continue
            if not candidate.is_dir():
                raise ConfigError(f"INFLUENCE_CACHE_DIR={raw!r} is not valid: {candidate} is a file, not a folder")
        except OSError:  # unreadable: leave it to the code that writes there
            pass
        return


def check_environment(env: Mapping[str, str]) -> None:
    """Check the environment-only variables (not settings: they have no flag, .env or file layer)."""
    for name in ENV_NUMBERS:
        env_number(name, env)
    check_cache_dir(env)


def _given(raw: str | None) -> str | None:
    # An empty environment or .env value means "not set", so the next source down applies: a
    # copied template or an `export NAME=` must never silently replace a saved setting.
    return raw if raw is not None and raw.strip() else None


def read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def read_settings_file(path: Path | None = None) -> dict[str, Any]:
    path = path or settings_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"settings file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a JSON object")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash mid-write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass
class Settings:
    model_path: str | None = None
    temperature: float = _D.temperature
    top_p: float = _D.top_p
    top_k: int | None = _D.top_k
    repeat_penalty: float = _D.repeat_penalty
    max_tokens: int = _D.max_tokens
    min_p: float = _D.min_p
    seed: int | None = None
    system_prompt: str | None = None
    think: bool = True  # reasoning models (engine.reasoning); off: they answer without thinking
    device: str = "auto"
    device_index: int = 0
    threads: int | None = None
    context_length: int | None = None  # KV cache positions a request can use (None: the model's, at most 4096)
    port: int = 8080
    host: str = "127.0.0.1"
    api_key: str | None = None
    warmup_tokens: int = 6
    mirror: str | None = None
    output_dir: str = "./models"
    save_chats: bool = True  # every chat of the app kept as a session file (chats.py)
    chats_dir: str | None = None  # None: the platform's data folder
    theme: str = "textual-dark"
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(
        cls,
        flags: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        use_file: bool = True,
    ) -> "Settings":
        """Resolve every setting from its strongest source; raise ConfigError on a bad value."""
        env = dict(os.environ) if env is None else env
        check_environment(env)
        dotenv = read_dotenv((cwd or Path.cwd()) / ".env")
        stored = read_settings_file() if use_file else {}
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for spec in SPECS:
            layers = (
                ("flag", flags.get(spec.name), f"--{spec.name.replace('_', '-')}"),
                ("env", _given(env.get(spec.env)), spec.env),
                (".env", _given(dotenv.get(spec.env)), f"{spec.env} in .env"),
                ("file", stored.get(spec.name), f"{spec.name} in {settings_file()}"),
            )
            for source, raw, label in layers:
                if raw is None:
                    continue
                values[spec.name] = _parse(spec, raw, label)
                sources[spec.name] = source
                break
            else:
                values[spec.name] = spec.default
                sources[spec.name] = "default"
        return cls(**values, sources=sources)

    def generation_params(self) -> GenerationParams:
        return GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
        )

    def rows(self, reveal: bool = False) -> list[dict[str, Any]]:
        out = []
        for spec in SPECS:
            value = getattr(self, spec.name)
            if spec.name in SENSITIVE and value and not reveal:
                value = "********"
            out.append(
                {"name": spec.name, "env": spec.env, "value": value, "source": self.sources.get(spec.name, "default"), "help": spec.help}
            )
        return out

    def save(self, names: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Path:
        """Write (some of) the settings into the user settings file, keeping the keys already there
        (`overrides`: values to write instead of those in use, e.g. the user's own while an opened
        chat's sampling settings apply)."""
        path = settings_file()
        try:
            data = read_settings_file(path)
        except ConfigError:
            data = {}
        for spec in SPECS:
            if names is None or spec.name in names:
                data[spec.name] = (overrides or {}).get(spec.name, getattr(self, spec.name))
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return path


def _parse(spec: Spec, raw: Any, label: str) -> Any:
    try:
        return spec.parse(raw)
    except ParamError as exc:
        reason = str(exc)
        if ": expected" in reason:
            reason = "expected" + reason.split(": expected", 1)[1]
        shown = "'********'" if spec.name in SENSITIVE else repr(raw)  # a secret is not echoed, even a bad one
        raise ConfigError(f"{label}={shown} is not valid: {reason}") from None


def validate_value(name: str, raw: Any) -> Any:
    """Parse one setting as typed (for the Settings screen and `/set`); ConfigError on a bad value."""
    spec = SPEC_BY_NAME[name]
    return _parse(spec, raw, name)
