"""Log-probabilities of the tokens an answer is made of (OpenAI's `logprobs` / `top_logprobs`,
Ollama's `logprobs` / `top_logprobs`, the legacy completions' `logprobs: N`).

Each value is the log-softmax of the model's own logits at that step, before the request's
penalties and temperature (what OpenAI reports), for the token picked and, on request, the N most
likely ones. A token's text is how it reads inside a text (SentencePiece's leading space kept) and
its bytes are its own, so a token that holds half of a UTF-8 character still says which half.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from influence_tui.engine.sampling import SamplerLayer
from influence_tui.engine.types import TokenLogprob

MAX_TOP = 20  # OpenAI's and Ollama's limit on alternatives per position


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's table), back to the bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Each token's text and bytes, worked out once per token id and kept."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        anchor = (tokenizer.encode("a") or [0])[-1]
        self.anchor, self.head = anchor, tokenizer.decode([anchor])
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        got = self.cache.get(token)
        if got is None:
            got = self.cache[token] = self._work_out(token)
        return got

    def _work_out(self, token: int) -> tuple[str, list[int]]:
        both = self.tok.decode([self.anchor, token])
        text = both[len(self.head):] if both.startswith(self.head) else self.tok.decode([token])
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        raw = self.tok.token_text(token) or ""  # part of a character: the vocabulary's own spelling says which bytes
        fallback = _BYTE_FALLBACK.fullmatch(raw)
        if fallback:
            return text, [int(fallback.group(1), 16)]
        if raw and all(c in _BYTE_DECODER for c in raw):
            return text, [_BYTE_DECODER[c] for c in raw]
        return text, list(text.encode("utf-8"))


def token_texts(tokenizer: Any) -> TokenTexts:
    from influence_tui.engine.tokenizer import cached_on

    return cached_on(tokenizer, "_token_texts", TokenTexts)


class LogprobSampler(SamplerLayer):
    """A request's sampler (plain, or JSON mode's) that also notes each pick's log-probability and
    the `top` most likely tokens; `pending` holds them until their text goes out with an event."""

    def __init__(self, inner: Any, top: int, texts: TokenTexts) -> None:
        super().__init__(inner)
        self.top, self.texts = top, texts
        self.pending: list[TokenLogprob] = []

    def __call__(self, logits: Any, history: list[int]) -> int:
        from influence_tui.engine.sampling import _as_numpy

        token = int(self.inner(logits, history))
        x = _as_numpy(logits).astype(np.float32, copy=False)
        top = x.max()
        lse = float(top + np.log(np.exp(x - top).sum()))
        self.pending.append(self._entry(token, float(x[token]) - lse, x, lse))
        return token

    def _entry(self, token: int, logprob: float, x: np.ndarray, lse: float) -> TokenLogprob:
        text, raw = self.texts(token)
        alternatives = []
        if self.top:
            best = np.argpartition(-x, self.top)[: self.top] if len(x) > self.top else np.arange(len(x))
            for i in best[np.argsort(-x[best], kind="stable")].tolist():
                t, b = self.texts(i)
                alternatives.append(TokenLogprob(t, float(x[i]) - lse, b))
        return TokenLogprob(text, logprob, raw, alternatives)

    def take(self) -> list[TokenLogprob]:
        out, self.pending = self.pending, []
        return out
