"""Tokenizers on the `tokenizers` library, chat templates on jinja2, incremental detokenisation.

No torch and no transformers at import. A GGUF file carries its vocabulary as metadata, not as a
tokenizer.json: the first load builds one with transformers' GGUF converter (a few seconds) and
caches it under the user cache dir, keyed by the file's path, size and mtime; later loads only
read that JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from influence_tui.engine.base import ModelLoadError

CHAT_ROLES = ("system", "user", "assistant", "tool")
# end-of-turn tokens of common chat formats: stop on them too when the vocabulary has them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
CACHE_VERSION = 1
PIECE_CACHE_CHARS = 4_000_000  # text whose token ids are kept (see HFTokenizer._pieces): ~40 MB at most


def cache_dir() -> Path:
    """Where converted tokenizers and weights are kept: $INFLUENCE_CACHE_DIR or the user cache dir."""
    import os

    chosen = os.environ.get("INFLUENCE_CACHE_DIR", "").strip()  # blank: not set, as every setting
    if chosen:
        return Path(chosen).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("influence-tui"))


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    # the same environment settings as transformers' apply_chat_template
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def _piece_splitter(tok: Tokenizer) -> tuple[re.Pattern[str], dict[str, int]] | None:
    """A pattern that splits text where the library does before anything else (its literal added
    tokens, longest first), and their ids; None where encoding piece by piece could differ."""
    for part in (tok.pre_tokenizer, tok.normalizer):
        if part is not None and b"Metaspace" in part.__getstate__():
            return None
    literal: dict[str, int] = {}
    for token_id, added in tok.get_added_tokens_decoder().items():
        if added.normalized:
            continue  # matched after normalisation, inside a piece: the library handles it there
        if added.lstrip or added.rstrip or added.single_word:
            return None  # they take whitespace around them: not a plain split
        literal[added.content] = token_id
    if not literal or len(literal) > 256:
        return None  # nothing to split at, or too many tokens for one regular expression to be quick
    alternatives = "|".join(re.escape(t) for t in sorted(literal, key=len, reverse=True))
    return re.compile(f"({alternatives})"), literal


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def cached_on(tokenizer: Any, attr: str, build: Any) -> Any:
    """What `build(tokenizer)` makes, worked out once per tokenizer and kept on it (a tokenizer that
    takes no new attributes works it out each time)."""
    cached = getattr(tokenizer, attr, None)
    if cached is None:
        cached = build(tokenizer)
        try:
            setattr(tokenizer, attr, cached)
        except AttributeError:
            pass
    return cached


@dataclass
class HFTokenizer:
    """Implements `engine.base.TextTokenizer`."""

    tok: Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: set[int] = field(default_factory=set)
    chat_template: str | None = None
    add_bos_token: bool = False  # prepend BOS on encode(add_special_tokens=True) when the backend does not
    extra_tokens: dict[str, str] = field(default_factory=dict)  # unk_token, pad_token for templates
    # see _pieces: how texts split at literal added tokens (False: not worked out yet), known pieces' ids
    _split: Any = field(default=False, init=False, repr=False, compare=False)
    _piece_ids: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _piece_chars: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def bos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not add_special_tokens and (pieces := self._pieces()) is not None:
            return self._encode_pieces(text, *pieces)
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    # A chat prompt is mostly the previous turn's prompt again: encoding it whole costs ~1.3 us a
    # token (0.5 ms for a 400-token conversation, on every turn's time to first token). The
    # library first splits a text at its literal added tokens (<|im_start|>, <|im_end|>) and
    # encodes the pieces between them independently, so the pieces' ids can be kept and only new
    # messages encoded. That holds unless a pre-tokenizer looks at where a piece lies in the whole
    # text (Metaspace prepending only at the start): those tokenizers encode whole texts.
    def _pieces(self) -> tuple[re.Pattern[str], dict[str, int]] | None:
        if self._split is False:
            self._split = _piece_splitter(self.tok)
        return self._split

    def _encode_pieces(self, text: str, split: re.Pattern[str], specials: dict[str, int]) -> list[int]:
        known = self._piece_ids
        ids: list[int] = []
        for i, piece in enumerate(split.split(text)):
            if i % 2:  # the captured separators: the added tokens themselves
                ids.append(specials[piece])
            elif piece:
                got = known.get(piece)
                if got is None:
                    got = self.tok.encode(piece, add_special_tokens=False).ids
                    if self._piece_chars + len(piece) > PIECE_CACHE_CHARS:
                        known.clear()  # bounded: a long-running server sees many conversations
                        self._piece_chars = 0
                    known[piece] = got
                    self._piece_chars += len(piece)
                ids.extend(got)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def special_ids_but(self, texts: tuple[str, ...]) -> frozenset[int] | None:
        """The special token ids other than those of `texts`; None when none of `texts` is special
        (decoding with skip_special_tokens then keeps them already)."""
        specials = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        if not any(content in texts for content in specials.values()):
            return None
        return frozenset(i for i, content in specials.items() if content not in texts)

    @property
    def thinks(self) -> bool:
        """A reasoning model: it writes <think> blocks (see engine.reasoning)."""
        from influence_tui.engine.reasoning import OPEN, template_thinks

        return template_thinks(self.chat_template, self.tok.token_to_id(OPEN) is not None)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **options: Any) -> str:
        """`options` reach the template as variables (Qwen3's `enable_thinking`)."""
        import jinja2

        for m in messages:
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(f"unknown chat role {m.get('role')!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **self.extra_tokens,
                **options,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc


def _end_of_turn_ids(tok: Tokenizer, eos: list[int]) -> set[int]:
    ids = set(eos)
    added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for text in END_OF_TURN_TOKENS:
        tid = tok.token_to_id(text)
        # <|endoftext|> only stops when it is the declared eos, or in chat-format vocabularies
        if tid is not None and text in added and (text != "<|endoftext|>" or not ids):
            ids.add(tid)
    return ids


# -- folders -----------------------------------------------------------------------------------
def load_folder_tokenizer(folder: str | Path) -> HFTokenizer:
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if not tj.exists():
        raise ModelLoadError(f"{folder}: tokenizer.json is missing (only fast tokenizers are supported)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
        raise ModelLoadError(f"{tj.name}: unreadable tokenizer ({exc})") from exc
    cfg = _read_json(folder / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if not template and jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    eos = _token_content(cfg.get("eos_token"))
    eos_ids = [tok.token_to_id(eos)] if eos and tok.token_to_id(eos) is not None else []
    gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if gen_eos is not None:
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    bos = _token_content(cfg.get("bos_token"))
    # the backend's post-processor usually adds BOS itself; honour the flag only where it does not
    adds_bos = bool(cfg.get("add_bos_token", False)) and bos is not None
    return HFTokenizer(
        tok=tok,
        bos_token=bos,
        eos_token=eos,
        eos_token_ids=_end_of_turn_ids(tok, eos_ids),
        chat_template=template,
        add_bos_token=adds_bos,
        extra_tokens={k: v for k in ("unk_token", "pad_token") if (v := _token_content(cfg.get(k)))},
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{path.name}: invalid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


# -- GGUF --------------------------------------------------------------------------------------
def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{CACHE_VERSION}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def build_gguf_tokenizer_json(path: str | Path) -> str:
    """The tokenizer.json text of a GGUF's vocabulary (slow: imports transformers)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tok_dict, _ = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    return backend.to_str()


def load_gguf_tokenizer(path: str | Path, metadata: dict[str, Any] | None = None) -> HFTokenizer:
    """From a GGUF file; `metadata`: its header's key/values if already read (arrays not needed)."""
    path = Path(path)
    if metadata is None:
        from influence_tui.formats.gguf import read_gguf_header

        metadata = read_gguf_header(path, skip_arrays=True).metadata
    md = metadata
    cached = cache_dir() / "tokenizers" / _gguf_cache_key(path) / "tokenizer.json"
    text = None
    if cached.exists():
        text = cached.read_text(encoding="utf-8")
    else:
        try:
            text = build_gguf_tokenizer_json(path)
        except Exception as exc:  # the converter raises many kinds for odd files
            raise ModelLoadError(f"{path.name}: cannot build its tokenizer ({type(exc).__name__}: {exc})") from exc
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(cached)
        except OSError:
            pass  # a read-only cache only costs speed
    tok = Tokenizer.from_str(text)

    def token(key: str) -> str | None:
        tid = md.get(f"tokenizer.ggml.{key}")
        return tok.id_to_token(int(tid)) if tid is not None else None

    eos_ids = [int(md[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if md.get(k) is not None]
    add_bos = md.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = md.get("tokenizer.ggml.model") == "llama"
    return HFTokenizer(
        tok=tok,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        eos_token_ids=_end_of_turn_ids(tok, eos_ids),
        chat_template=md.get("tokenizer.chat_template"),
        add_bos_token=bool(add_bos),
        extra_tokens={k: v for k, key in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
                      if (v := token(key))},
    )


# -- streaming ---------------------------------------------------------------------------------
class IncrementalDecoder:
    """Token ids in, text deltas out: never a broken UTF-8 character, never a lost leading space.

    Decodes a short window ids[prefix:] and returns what it adds to the text of ids[prefix:read]:
    the window keeps the previous token for context (SentencePiece strips the space of a first
    token; byte-level BPE may split a character over several tokens).
    """

    def __init__(self, tokenizer: HFTokenizer | Any, skip_special_tokens: bool = False,
                 hidden: frozenset[int] | None = None) -> None:
        """`hidden`: with skip_special_tokens, the special ids to drop, where some special ones
        must come out as text (a reasoning model's think tags, see `special_ids_but`)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.hidden = hidden
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if isinstance(self.tokenizer, HFTokenizer):
            if self.hidden is not None and self.skip_special_tokens:
                return self.tokenizer.decode([i for i in ids if i not in self.hidden])
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end comes out as-is)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else text
