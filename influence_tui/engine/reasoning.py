"""Reasoning models ("thinking"): their `<think>…</think>` text kept apart from the answer.

DeepSeek-R1's distills (Llama and Qwen2 architectures), QwQ and their kin write their reasoning
between `<think>` and `</think>`, then the answer. Most of their chat templates open the block
themselves (the generation prompt ends with `<think>\\n`), so the model's own output starts inside
it and only the closing tag comes out. Clients want the two apart, as Ollama (`thinking`) and
llama-server (`reasoning_content`) give them, and the app shows the reasoning folded above the
answer. A request may also ask the model not to think: the prompt then ends with an empty block,
as Qwen3's `enable_thinking=False` and DeepSeek's own advice do.

Pure text, no torch: the scheduler feeds each decoded delta through a `ThinkSplitter`.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
EMPTY_BLOCK = f"{OPEN}\n\n{CLOSE}\n\n"


def template_thinks(template: str | None, vocab_has_open: bool = False) -> bool:
    """Whether a model reasons in think blocks: its template handles them (R1 strips them from
    earlier answers, Qwen3 opens or closes them) or its vocabulary has the tag as one token."""
    return bool(template and CLOSE in template) or vocab_has_open


def opens_thinking(prompt_text: str) -> bool:
    """The rendered prompt leaves a think block open: the answer starts inside it."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


def without_thinking(prompt_text: str) -> str:
    """The rendered prompt with the think block already closed and empty, so the model answers
    straight away (a prompt that closed one itself, Qwen3's enable_thinking=False, is kept)."""
    tail = prompt_text.rstrip()
    if tail.endswith(OPEN):
        return tail + f"\n\n{CLOSE}\n\n"
    if tail.endswith(CLOSE):
        return prompt_text
    return prompt_text + EMPTY_BLOCK


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back: the rest of
    the tag may come with the next token)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Text deltas in, (thinking, answer) deltas out.

    `inside`: the prompt left a block open (see `opens_thinking`). Otherwise a block counts only at
    the very start of the answer (after blank space): a `<think>` later in an answer is text. The
    blank lines around the reasoning and before the answer are dropped, as Ollama drops them.
    """

    def __init__(self, inside: bool = False) -> None:
        self.state = "think" if inside else "start"
        self.held = ""  # text not given out yet: a possible tag's start, blank space at an edge
        self.began = not inside  # inside: the reasoning's leading blank space is still to drop

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        thinking, answer = [], []
        while self.held:
            if self.state == "start":
                body = self.held.lstrip()
                if body.startswith(OPEN):
                    self.held, self.state, self.began = body[len(OPEN):], "think", False
                    continue
                if not body or OPEN.startswith(body):
                    break  # still blank, or still maybe "<think>"
                self.state = "answer"
            elif self.state == "think":
                if not self.began:
                    self.held = self.held.lstrip()
                    if not self.held:
                        break
                    self.began = True
                at = self.held.find(CLOSE)
                if at >= 0:
                    thinking.append(self.held[:at].rstrip())
                    self.held, self.state = self.held[at + len(CLOSE):], "after"
                    continue
                # keep back a tag's possible start and trailing blank space (it may end the reasoning)
                cut = len(self.held) - _partial_suffix(self.held, CLOSE)
                cut = len(self.held[:cut].rstrip())
                thinking.append(self.held[:cut])
                self.held = self.held[cut:]
                break
            elif self.state == "after":
                self.held = self.held.lstrip()
                if not self.held:
                    break
                self.state = "answer"
            else:
                answer.append(self.held)
                self.held = ""
        return "".join(thinking), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end of the answer: an unclosed block's end is reasoning (the
        answer was cut off while thinking), a lone tag's start is answer text."""
        held, self.held = self.held, ""
        if self.state == "think":
            return held.rstrip(), ""
        if self.state in ("start", "answer"):
            return "", held
        return "", ""
