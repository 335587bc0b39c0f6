"""Fill-in-the-middle: code completion between a prefix and a suffix (Ollama's `suffix` on
/api/generate, OpenAI's `suffix` on /v1/completions: what editor plugins such as Continue send for
autocomplete).

A code model is trained on prompts that name both sides with special tokens and then writes the
middle. Which tokens, and in which order, is read from its vocabulary, as llama.cpp does when a
GGUF does not name them: prefix-suffix-middle for Qwen2.5-Coder, StarCoder, Granite, CodeLlama and
DeepSeek-Coder, suffix-prefix for Codestral. A model with none of them cannot fill in (Ollama's
capability `insert`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (prefix, suffix, middle) as each family spells them; a middle of "" means suffix-first order
SPELLINGS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Granite code
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # CodeLlama (SentencePiece)
    ("<PRE>", "<SUF>", "<MID>"),
    ("[PREFIX]", "[SUFFIX]", ""),  # Codestral: [SUFFIX]suffix[PREFIX]prefix
)


# what ends a middle besides the model's end of turn: an instruct model's EOS is <|im_end|>, but it
# writes the base model's end of text (or a pad, or a new file) after a middle, as llama.cpp knows
ENDS = ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<fim_pad>", "<file_sep>", "▁<EOT>", "<EOT>",
        "<｜end▁of▁sentence｜>")


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int | None  # None: the suffix comes first and the prefix's token opens the middle


def fim_tokens(tokenizer: Any) -> FimTokens | None:
    """The model's fill-in-the-middle tokens, None when its vocabulary has none."""
    vocab = tokenizer.tok
    for pre, suf, mid in SPELLINGS:
        ids = [vocab.token_to_id(t) for t in (pre, suf, mid) if t]
        if all(i is not None for i in ids):
            return FimTokens(ids[0], ids[1], ids[2] if mid else None)
    return None


def fim_end_ids(tokenizer: Any) -> frozenset[int]:
    ids = (tokenizer.tok.token_to_id(t) for t in ENDS)
    return frozenset(i for i in ids if i is not None)


def _encode_inside(tokenizer: Any, text: str) -> list[int]:
    """`text` encoded as it reads after other text: a SentencePiece tokenizer (Llama's) would put a
    space before it, which CodeLlama's suffix must not have (Meta's encode_infilling drops it)."""
    head = tokenizer.encode("\n")
    both = tokenizer.encode("\n" + text)
    if head and both[: len(head)] == head and tokenizer.decode(both[len(head):]) == text:
        return both[len(head):]
    return tokenizer.encode(text)


def infill_ids(tokenizer: Any, fim: FimTokens, prefix: str, suffix: str) -> list[int]:
    """The prompt whose continuation is the middle (the model's BOS first where it takes one)."""
    pre, suf = tokenizer.encode(prefix), _encode_inside(tokenizer, suffix)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
    if fim.middle is None:
        return bos + [fim.suffix, *suf, fim.prefix, *pre]
    return bos + [fim.prefix, *pre, fim.suffix, *suf, fim.middle]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with special tokens puts the BOS first (Llama's tokenizers do, Qwen's not)."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id
