"""JSON mode: answers that are one JSON object (Ollama's `format: "json"`, OpenAI's
`response_format: {"type": "json_object"}`, `influence generate --format json`).

Each step, the candidate tokens are tried in the order of their logits against a character-level
JSON recognizer (a pushdown automaton: a stack of open objects and arrays, and where in a string,
number or literal it is), and the request's own sampler draws among those that keep the text a
valid prefix of a JSON object. Greedy takes the first that fits, so a step checks one or a few
tokens; a sampled step checks the top CANDIDATES. The answer ends when the object closes (as
llama.cpp's json.gbnf, whose root is an object). Runs of whitespace are capped, so a model cannot
pad forever (a known failure of grammar-constrained JSON).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from influence_tui.engine.sampling import SamplerLayer

if TYPE_CHECKING:
    from influence_tui.engine.sampling import Sampler

CANDIDATES = 48  # tokens a sampled step checks before widening the search
MAX_WHITESPACE = 64  # consecutive whitespace characters allowed between JSON tokens (deep indents fit)
WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
ESCAPES = '"\\/bfnrtu'
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# where the recognizer is between characters
START, VALUE, KEY_OR_END, KEY, COLON, OBJ_NEXT, VALUE_OR_END, ARR_NEXT, STRING, NUMBER, LITERAL, DONE = range(12)
# number states that may end the number
NUMBER_ENDS = {"zero", "int", "frac", "exp_digits"}


class JsonPrefix:
    """Whether a text is a prefix of one JSON object; fed piece by piece."""

    __slots__ = ("stack", "mode", "key", "escape", "hex_left", "number", "literal", "spaces")

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "[" per open container
        self.mode = START
        self.key = False  # the string being read is an object key
        self.escape = False
        self.hex_left = 0  # \uXXXX digits still to come
        self.number = ""  # the number's grammar state
        self.literal = ""  # what is left of true / false / null
        self.spaces = 0

    def copy(self) -> "JsonPrefix":
        other = JsonPrefix.__new__(JsonPrefix)
        other.stack = self.stack.copy()
        other.mode, other.key, other.escape, other.hex_left = self.mode, self.key, self.escape, self.hex_left
        other.number, other.literal, other.spaces = self.number, self.literal, self.spaces
        return other

    @property
    def complete(self) -> bool:
        return self.mode == DONE

    can_end = complete  # the object closed: nothing may follow it

    def feed(self, text: str) -> bool:
        """Take `text`; False (and the state undefined) at its first character that no JSON object could have."""
        for ch in text:
            if not self._char(ch):
                return False
        return True

    def _char(self, ch: str) -> bool:
        mode = self.mode
        if mode == STRING:
            return self._string(ch)
        if mode == NUMBER:
            if self._number(ch):
                return True
            if self.number not in NUMBER_ENDS:
                return False
            self._value_done()  # the number ended at this character, which comes next
            return self._char(ch)
        if mode == LITERAL:
            if not self.literal or ch != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._value_done()
            return True
        if ch in WHITESPACE:
            self.spaces += 1
            return self.spaces <= MAX_WHITESPACE
        self.spaces = 0
        if mode == START:
            return self._open(ch) if ch == "{" else False
        if mode == DONE:
            return False
        if mode in (VALUE, VALUE_OR_END):
            if mode == VALUE_OR_END and ch == "]":
                return self._close("[")
            return self._value(ch)
        if mode in (KEY_OR_END, KEY):
            if mode == KEY_OR_END and ch == "}":
                return self._close("{")
            if ch != '"':
                return False
            self.mode, self.key = STRING, True
            return True
        if mode == COLON:
            if ch != ":":
                return False
            self.mode = VALUE
            return True
        if mode in (OBJ_NEXT, ARR_NEXT):
            if ch == ",":
                self.mode = KEY if mode == OBJ_NEXT else VALUE
                return True
            return self._close("{" if mode == OBJ_NEXT else "[") if ch == ("}" if mode == OBJ_NEXT else "]") else False
        return False

    def _value(self, ch: str) -> bool:
        if ch in "{[":
            return self._open(ch)
        if ch == '"':
            self.mode, self.key = STRING, False
            return True
        if ch == "-" or ch in DIGITS:
            self.mode, self.number = NUMBER, "sign" if ch == "-" else ("zero" if ch == "0" else "int")
            return True
        if ch in LITERALS:
            self.mode, self.literal = LITERAL, LITERALS[ch]
            return True
        return False

    def _open(self, ch: str) -> bool:
        self.stack.append(ch)
        self.mode = KEY_OR_END if ch == "{" else VALUE_OR_END
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        if not self.stack:
            self.mode = DONE
        else:
            self.mode = OBJ_NEXT if self.stack[-1] == "{" else ARR_NEXT

    def _string(self, ch: str) -> bool:
        if self.hex_left:
            if ch not in HEX:
                return False
            self.hex_left -= 1
            return True
        if self.escape:
            if ch not in ESCAPES:
                return False
            self.escape = False
            self.hex_left = 4 if ch == "u" else 0
            return True
        if ch == "\\":
            self.escape = True
            return True
        if ch == '"':
            if self.key:
                self.mode, self.key = COLON, False
            else:
                self._value_done()
            return True
        return ch >= " "  # control characters must be escaped

    def _number(self, ch: str) -> bool:
        """One more character of the number, if the grammar takes it here."""
        n = self.number
        digit = ch in DIGITS
        if n == "sign" and digit:
            self.number = "zero" if ch == "0" else "int"
        elif n == "int" and digit or n in ("frac", "dot") and digit or n in ("exp", "exp_sign", "exp_digits") and digit:
            self.number = {"int": "int", "dot": "frac", "frac": "frac"}.get(n, "exp_digits")
        elif n in ("zero", "int") and ch == ".":
            self.number = "dot"
        elif n in ("zero", "int", "frac") and ch in "eE":
            self.number = "exp"
        elif n == "exp" and ch in "+-":
            self.number = "exp_sign"
        else:
            return False
        return True


class Vocabulary:
    """Each token's text as it reads inside a text (special tokens: ""), and the tokens grouped by
    their first character. Worked out once per tokenizer (~0.1 s for 50k tokens).

    A token is decoded after a plain anchor token and the anchor's text taken off: decoded on its
    own, a SentencePiece token loses its leading space (Llama's decoder strips one), so "▁rue"
    would read "rue" and `t` + `▁rue` would pass for `true`."""

    def __init__(self, tokenizer: Any) -> None:
        tok = tokenizer.tok
        n = tokenizer.vocab_size
        anchor = (tokenizer.encode("a") or [0])[-1]
        head = tok.decode([anchor], skip_special_tokens=True)
        special = set(tokenizer.eos_token_ids) | {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        texts = tok.decode_batch([[anchor, i] for i in range(n)], skip_special_tokens=True)
        self.texts = ["" if i in special or not t.startswith(head) else t[len(head):] for i, t in enumerate(texts)]
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            if text:
                groups.setdefault(text[0], []).append(i)
        self.by_first = {ch: np.array(ids) for ch, ids in groups.items()}


def vocabulary(tokenizer: Any) -> Vocabulary:
    from influence_tui.engine.tokenizer import cached_on

    return cached_on(tokenizer, "_json_vocabulary", Vocabulary)


class JsonSampler:
    """A request's sampler restricted to tokens that keep the answer a JSON object's prefix.

    The scheduler calls it as it calls a Sampler; `complete` tells it when the object closed.
    The request's penalties apply before the candidates are ranked (greedy takes the best
    penalised token that fits), then its temperature, top-k/p and seed pick among those that fit."""

    def __init__(self, sampler: "Sampler", vocab: Vocabulary, eos_ids: set[int], state: Any = None,
                 escape: frozenset[int] = frozenset()) -> None:
        from influence_tui.engine.sampling import Sampler

        self.sampler = sampler
        self.vocab = vocab
        self.texts = vocab.texts
        self.eos_ids = eos_ids
        # any JSON object, or a JSON schema's values (json_schema.SchemaPrefix: the same interface)
        self.state = state if state is not None else JsonPrefix()
        self.stopped = False
        # tokens that may open the answer instead of the object: a tool call's own tag (with tools,
        # the model either calls one or answers in the format, as OpenAI's API lets it); once one
        # is picked the answer is the call's, unconstrained
        self.escape, self.free, self.started = escape, False, False
        # the final pick without the penalties (already applied), drawing from the request's generator
        self.picker = Sampler(sampler.p.with_(repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0))
        self.picker.rng, self.picker.seed = sampler.rng, sampler.seed

    # the scheduler's batched greedy path takes every row's plain argmax: never for this one
    picks_best = False
    needs_penalties = True

    @property
    def complete(self) -> bool:
        return self.stopped or (not self.free and self.state.complete)

    def __call__(self, logits: Any, history: list[int]) -> int:
        from influence_tui.engine.sampling import _as_numpy, _penalise

        if self.free:
            return self.sampler(logits, history)
        x = _as_numpy(logits)
        if self.sampler.needs_penalties:
            x = x.copy()
            _penalise(x, self.sampler.p, history, self.sampler.generated)
        allowed = self._allowed(x, greedy=self.sampler.picks_best)
        if not allowed:  # nothing continues the text (a vocabulary without the JSON characters)
            self.stopped = True
            return next(iter(self.eos_ids), int(x.argmax()))
        masked = np.full_like(x, -np.inf)
        masked[allowed] = x[allowed]
        token = self.picker(masked, history)
        self.sampler.generated[token] += 1  # what the presence/frequency penalties count
        if token in self.eos_ids:  # a value that could go on (a number at the top) ended here
            self.stopped = True
        elif token in self.escape and not self.started:
            self.free = True
        else:
            self.state.feed(self.texts[token])
        self.started = True
        return token

    def _fits(self, token: int, x: np.ndarray) -> bool:
        if not np.isfinite(x[token]):
            return False
        if token in self.eos_ids:
            return self.state.can_end
        if token in self.escape:
            return not self.started
        text = self.texts[token]
        return bool(text) and self.state.copy().feed(text)

    def _allowed(self, x: np.ndarray, greedy: bool) -> list[int]:
        """Token ids that keep the text valid, in the order of the logits: the first one (greedy)
        or those among the top CANDIDATES. Where none of those fit, only the tokens whose first
        character the recognizer takes now are tried (a few hundred checks, not the vocabulary)."""
        n = min(len(x), len(self.texts))
        top = np.argpartition(-x[:n], CANDIDATES)[:CANDIDATES] if n > CANDIDATES else np.arange(n)
        top = top[np.argsort(-x[top], kind="stable")]
        found = []
        for token in top.tolist():
            if self._fits(token, x):
                found.append(token)
                if greedy:
                    return found
        if found:
            return found
        starts = [ids for ch, ids in self.vocab.by_first.items() if self.state.copy().feed(ch)]
        if not starts:
            return found
        pool = np.concatenate(starts)
        pool = pool[pool < n]
        for token in pool[np.argsort(-x[pool], kind="stable")].tolist():
            if self._fits(token, x):
                found.append(token)
                if greedy or len(found) >= CANDIDATES:
                    break
        return found


class CallFirst(SamplerLayer):
    """tool_choice "required" or a named tool: the answer's first token is one of the model's call
    tags (engine.tools.tool_openers), so it is a call; then the request's own sampler goes on."""

    def __init__(self, inner: Any, openers: frozenset[int]) -> None:
        super().__init__(inner)
        self.openers, self.started = sorted(openers), False

    def __call__(self, logits: Any, history: list[int]) -> int:
        from influence_tui.engine.sampling import _as_numpy

        if self.started:
            return self.inner(logits, history)
        self.started = True
        x = _as_numpy(logits)
        masked = np.full_like(x, -np.inf)
        masked[self.openers] = x[self.openers]
        return self.inner(masked, history)


class Biased(SamplerLayer):
    """OpenAI's logit_bias: the values added to their tokens' logits before the request's sampler
    (and JSON mode's candidate ranking) sees them."""

    def __init__(self, inner: Any, bias: dict[int, float]) -> None:
        super().__init__(inner)
        self.ids = np.array(sorted(bias), dtype=np.int64)
        self.values = np.array([bias[i] for i in sorted(bias)], dtype=np.float32)

    def __call__(self, logits: Any, history: list[int]) -> int:
        from influence_tui.engine.sampling import _as_numpy

        x = _as_numpy(logits).astype(np.float32, copy=True)
        x[self.ids] += self.values
        return self.inner(x, history)
