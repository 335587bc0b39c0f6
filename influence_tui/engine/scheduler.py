"""The worker thread's half of the engine: slots, admission, batched decode, the prefix cache.

Only the engine's worker thread calls into a `Scheduler`. Each running request holds one KV-cache
slot. A new request is admitted at the next step (prefilled, then decoded with everyone else; a
long prompt that arrives while others stream is prefilled in pieces inside their decode steps, where
prompts run as kernel rows); a finished one leaves. A finished conversation's slot keeps its KV
entries, so a follow-up that starts with the same tokens (the next chat turn, or an API request
sharing a system prompt) only prefills what is new. A request that shares only a prefix with
another conversation's slot gets a copy of those positions in a slot of its own, so conversations
do not evict each other.
Requests admitted together that begin alike have their common prefix prefilled once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from influence_tui.engine.base import LoadedModel
from influence_tui.engine.infill import fim_end_ids, fim_tokens
from influence_tui.engine.reasoning import CLOSE, OPEN, ThinkSplitter, opens_thinking, without_thinking
from influence_tui.engine.sampling import Sampler, StopMatcher, greedy
from influence_tui.engine.tools import TAGS as TOOL_TAGS
from influence_tui.engine.tools import (
    MISTRAL,
    ToolCallParser,
    formats_of,
    mistral_ids,
    one_call_per_turn,
    template_takes_tools,
    tool_openers,
)
from influence_tui.engine.tokenizer import IncrementalDecoder
from influence_tui.engine.types import GenerationRequest, GenerationStream, Result, TokenEvent, Usage


class RequestError(ValueError):
    """The request cannot run on this model (message is user-facing)."""


def schema_state(schema: Any) -> Any:
    """The recognizer of a request's JSON schema (None: any JSON object); RequestError if it cannot be followed."""
    if schema is None:
        return None
    from influence_tui.engine.json_schema import SchemaError, SchemaPrefix, compile_schema

    try:
        return SchemaPrefix(compile_schema(schema))
    except SchemaError as exc:
        raise RequestError(f"JSON schema: {exc}") from None
    except Exception as exc:  # a schema no check foresaw: this request's error, never the batch's
        raise RequestError(f"JSON schema: cannot be followed ({type(exc).__name__}: {exc})") from None


def _inference() -> Any:
    """torch's inference mode around model calls where torch is loaded. The kernel's own model
    (`native_model.KernelLlama`) never imports it: its logits are numpy arrays."""
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


def _rows(logits: Any) -> np.ndarray:
    """A step's logits as float32 numpy rows (a torch index costs ~35 us right after a step)."""
    if isinstance(logits, np.ndarray):
        return logits
    return logits.float().cpu().numpy()


@dataclass
class Job:
    request: GenerationRequest
    stream: GenerationStream
    model_path: str | None  # None = whatever is loaded
    submitted: float = field(default_factory=time.perf_counter)
    load_s: float = 0.0  # the model load this request waited for (Ollama's load_duration)


# Prompts are prefilled in chunks aligned to multiples of CHUNK positions, full chunks as dense
# matmuls: a chunk's numbers do not depend on whether the tokens before it came from the cache or
# were just computed (bf16 matmuls of different shapes round differently, and greedy decoding
# amplifies that into different text). With the C decode kernel (model.rows_exact) the rest of a
# prompt runs as kernel rows, which compute each position exactly as a decode step does, whatever
# is batched with it. A cached position is reused when a cold start of the new prompt would
# compute it the same way (dense where the cold start has full chunks, rows after), so a request
# gets the same answer whatever the cache held. One exception, for speed: a conversation that
# grows past a chunk boundary keeps its rows where a cold start would have a dense chunk (as
# llama-server's cache_prompt does); such a slot is marked and only its exact part is shared.
# Where whole prompts run as kernel rows (model.rows_only: the kernel without matrix units to beat
# it) every cached position is exact and all of a shared prefix is reused.
CHUNK = 128
CONTINUE_MIN = 32  # reused rows beyond the exact part that make a request a conversation's continuation
KEEP_LOSS = 32  # cached positions a request may overwrite in a slot it takes over (else it copies)
SHARE_MIN = 16  # positions prompts admitted together must have in common (beyond their caches) to prefill them once
# Where prompts run as kernel rows, a long prompt that arrives while others stream is prefilled
# PIECE rows at a time inside their decode steps (one kernel call for both, as llama-server's
# continuous batching does): the streams slow down for a while instead of stopping.
PIECE = 128


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # ids whose K/V are valid in this slot
    dense: int = 0  # leading positions computed as full aligned chunks (the rest: as rows)
    approx: bool = False  # rows stand in for dense chunks past `dense` (a continued conversation)
    busy: bool = False
    last_used: float = 0.0

    def forget(self) -> None:
        """Drop the cached positions (the K/V stay in memory but count for nothing)."""
        self.tokens, self.dense, self.approx = [], 0, False


@dataclass
class Sequence:
    job: Job
    slot: Slot
    prompt: list[int]
    sampler: Any  # a Sampler, or a JsonSampler around one (JSON mode)
    decoder: IncrementalDecoder
    stopper: StopMatcher
    usage: Usage
    history: list[int]
    last_token: int = -1
    generated: int = 0
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    splitter: ThinkSplitter | None = None  # a reasoning model's answer: reasoning apart from the text
    tool_parser: ToolCallParser | None = None  # a request with tools: calls read out of the answer
    limit: int = 0  # max new tokens after context fitting
    filling: bool = False  # its prompt is still being prefilled, PIECE rows per step
    admitted: float = 0.0
    logprobs: list[Any] | None = None  # with request.logprobs: the tokens whose text went out


def _check_unicode(request: GenerationRequest) -> None:
    """A lone surrogate (JSON's "\udcce", undecodable bytes read with surrogateescape) makes the
    tokenizer raise a TypeError, which would fail every request admitted with this one."""
    texts = [request.prompt or "", request.system or ""] + [m.content for m in request.messages or []]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"the text holds {text[exc.start]!r} at character {exc.start}: not valid Unicode "
                               "(a lone surrogate)") from None


def _drop_turns(msgs: list[dict[str, str]], k: int) -> tuple[list[dict[str, str]], int]:
    """`msgs` after up to k drops of the oldest turn that is not a system message and not the
    last message (a user turn goes together with what answered it: the assistant's messages and
    tool results up to the next user turn, so no tool result is left without its call); the drops done."""
    out = list(msgs)
    for done in range(k):
        i = next((j for j, m in enumerate(out[:-1]) if m["role"] != "system"), None)
        if i is None:
            return out, done
        out.pop(i)
        while i < len(out) - 1 and out[i]["role"] in ("assistant", "tool"):
            out.pop(i)
    return out, k


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, loaded: LoadedModel) -> None:
        self.lm = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        max_batch = int(loaded.extra.get("max_batch", 8))
        self.max_seq = int(loaded.extra.get("max_seq", loaded.context_length))
        self.slots = [Slot(i) for i in range(max_batch)]
        self.active: list[Sequence] = []
        self.eos = set(self.tok.eos_token_ids)
        self.thinks = bool(getattr(self.tok, "thinks", False))
        template = getattr(self.tok, "chat_template", None)
        self.takes_tools = template_takes_tools(template)
        self._tool_formats = formats_of(template)
        self._mistral_ids = bool(template) and MISTRAL in template  # its call ids: 9 letters and digits
        self._one_call = bool(template) and "single tool-calls" in template  # Llama 3.x: one call a turn
        # a reasoning model's think tags, and with tools the call tags, come out as text even where
        # the vocabulary marks them special: the splitter and the call parser read them
        self._hidden = self.tok.special_ids_but((OPEN, CLOSE)) if self.thinks else None
        self._hidden_tools = self.tok.special_ids_but((OPEN, CLOSE, *TOOL_TAGS)) if self.takes_tools else None
        self._tool_openers = tool_openers(self.tok, self._tool_formats) if self.takes_tools else frozenset()
        self.fim = fim_tokens(self.tok) if hasattr(getattr(self.tok, "tok", None), "token_to_id") else None
        self._fim_ends = fim_end_ids(self.tok) if self.fim is not None else frozenset()

    # --- prompt building -----------------------------------------------------------------------
    def context_limit(self, request: GenerationRequest) -> int:
        limit = min(self.lm.context_length, self.max_seq)
        if request.num_ctx:
            limit = min(limit, max(int(request.num_ctx), 16))
        return limit

    def _messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        msgs = [m.to_dict() for m in (request.messages or [])]
        if request.prompt is not None:
            msgs.append({"role": "user", "content": request.prompt})
        if request.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": request.system})
        if self._one_call:
            msgs = one_call_per_turn(msgs)
        return mistral_ids(msgs) if self._mistral_ids else msgs

    def _render(self, msgs: list[dict[str, Any]], options: dict[str, Any] | None = None) -> list[int]:
        """`options`: the template's variables for this request (see `_template_options`)."""
        options = options or {}
        no_think = options.get("enable_thinking") is False
        if self.tok.has_chat_template:
            last = msgs[-1] if msgs else {}
            # a conversation that ends with the assistant's own words (Anthropic's prefill, llama-server's
            # and Ollama's too): the answer goes on from them instead of starting a new turn
            prefill = last.get("role") == "assistant" and bool(last.get("content")) and not last.get("tool_calls")
            try:
                text = self.tok.apply_chat_template(msgs, add_generation_prompt=not prefill, **options)
            except Exception as exc:  # a template's raise_exception (e.g. roles must alternate)
                raise RequestError(f"the model's chat template rejected the messages: {exc}") from None
            if prefill:
                end = text.rfind(last["content"])
                if end >= 0:  # (cut where the words end, as transformers' continue_final_message does)
                    text = text[: end + len(last["content"])]
                else:  # a template that rewrote them: a new turn after all
                    text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, **options)
            if no_think:
                text = without_thinking(text)
            return self.tok.encode(text, add_special_tokens=False)
        # No template: plain "role: content" lines, so at least the text reaches the model.
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
        return self.tok.encode(text, add_special_tokens=True)

    def count_prompt(self, request: GenerationRequest) -> int:
        """The tokens of the prompt as written, however long (nothing dropped to fit the context)."""
        _check_unicode(request)
        if request.raw and request.prompt is not None:
            return len(self.tok.encode(request.prompt, add_special_tokens=True))
        msgs = self._messages(request)
        if not msgs:
            raise RequestError("nothing to count: give messages")
        return len(self._render(msgs, self._template_options(request)))

    def build_prompt(self, request: GenerationRequest) -> tuple[list[int], int, int]:
        """(prompt ids, tokens dropped to fit, max new tokens). Oldest turns go first; the system
        prompt and the last message always stay."""
        _check_unicode(request)
        ids, dropped, limit = self._build_prompt(request)
        if request.context:
            ctx = self.context_limit(request)
            ids, cut = self._continue_from(request.context, ids, ctx, request.params.max_tokens)
            dropped, limit = dropped + cut, max(min(request.params.max_tokens, ctx - len(ids)), 0)
        return ids, dropped, limit

    def _continue_from(self, context: list[int], ids: list[int], ctx: int, want: int) -> tuple[list[int], int]:
        """An earlier answer's token ids, then this prompt's as the template renders it (a template
        that starts with BOS starts each turn with it); where they do not fit with room to answer,
        the oldest context tokens go. (ids, context tokens dropped)"""
        vocab = self.tok.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in context):
            raise RequestError(f"context must hold token ids from 0 to {vocab - 1} (an earlier answer's, from this model)")
        total = len(context) + len(ids)
        keep = total if total + want <= ctx else max(ctx - want, min(total, ctx // 2))
        room = max(keep - len(ids), 0)
        kept = context[len(context) - room:] if room < len(context) else context
        if len(kept) + len(ids) >= ctx:
            raise RequestError(f"the prompt is {len(ids)} tokens but the context holds {ctx}: shorten it")
        return list(kept) + ids, len(context) - len(kept)

    def _fit(self, msgs: list[dict[str, Any]], room: int, options: dict[str, Any] | None = None) -> list[int]:
        """The prompt with the fewest oldest turns dropped that fits in `room` tokens (or with all
        droppable ones gone). A binary search over how many drops: one render per drop took ~400
        renders of a 40k-token chat, seconds before its first token."""
        most, steps = _drop_turns(msgs, len(msgs))
        best = self._render(most, options)
        if len(best) > room:  # even with every droppable turn gone
            return best
        lo, hi = 0, steps  # `lo` drops do not fit (the caller checked 0), `hi` drops do: `best`
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = self._render(_drop_turns(msgs, mid)[0], options)
            if len(ids) <= room:
                hi, best = mid, ids
            else:
                lo = mid
        return best

    def _fit_one_at_a_time(self, msgs: list[dict[str, Any]], room: int, options: dict[str, Any] | None = None) -> list[int]:
        """The same drops as _fit, rendering only the shapes reached one drop after another
        (the caller found the whole chat too long)."""
        shorter, ids = list(msgs), []
        while True:
            shorter, done = _drop_turns(shorter, 1)  # one more drop from where the last one left it
            if not done and ids:
                return ids
            ids = self._render(shorter, options)
            if len(ids) <= room or not done:
                return ids

    def _infill_prompt(self, request: GenerationRequest, ctx: int, want: int) -> tuple[list[int], int, int]:
        """Fill-in-the-middle: the model's own prefix/suffix/middle tokens around the two sides."""
        from influence_tui.engine.infill import infill_ids

        if self.fim is None:
            raise RequestError(f'"{self.lm.name}" does not support insert (its vocabulary has no fill-in-the-middle tokens)')
        ids = infill_ids(self.tok, self.fim, request.prompt or "", request.suffix or "")
        if len(ids) >= ctx:
            raise RequestError(f"the prompt and suffix are {len(ids)} tokens but the context holds {ctx}: shorten them")
        return ids, 0, max(min(want, ctx - len(ids)), 0)

    def _template_options(self, request: GenerationRequest) -> dict[str, Any]:
        """The chat template's variables beyond the messages: `tools` (RequestError where the
        template has no place for them: they would vanish from the prompt), and
        `enable_thinking=False` for a reasoning model told not to think (JSON mode: no room to)."""
        options: dict[str, Any] = {}
        if request.tools:
            if not self.takes_tools:
                raise RequestError(f"{self.lm.name} does not support tools (its chat template has no place for them)")
            if request.format == "json" and not self._tool_openers:  # a call could not be told from the object
                raise RequestError(f"JSON mode and tools cannot go together on {self.lm.name}: its tool calls do not "
                                   "start with a tag of their own, so the answer forced into the format could call no tool")
            options["tools"] = request.tools
        if self.thinks and (request.think is False or request.format == "json"):
            options["enable_thinking"] = False
        return options

    def _build_prompt(self, request: GenerationRequest) -> tuple[list[int], int, int]:
        ctx = self.context_limit(request)
        want = request.params.max_tokens
        if request.suffix is not None:
            return self._infill_prompt(request, ctx, want)
        if request.raw and request.prompt is not None:
            ids = self.tok.encode(request.prompt, add_special_tokens=True)
            if not ids:
                raise RequestError("the prompt is empty")
            dropped = 0
            if len(ids) + want > ctx:
                keep = max(ctx - want, min(len(ids), ctx // 2))
                dropped, ids = len(ids) - keep, ids[len(ids) - keep:]
            return ids, dropped, max(min(want, ctx - len(ids)), 0)
        msgs = self._messages(request)
        if not msgs:
            raise RequestError("nothing to generate from: give a prompt or messages")
        options = self._template_options(request)
        ids = self._render(msgs, options)
        full = len(ids)
        if len(ids) + want > ctx:
            try:
                ids = self._fit(msgs, ctx - want, options)
            except RequestError:  # a probe's shape the template rejects (alternation): one drop at a time
                ids = self._fit_one_at_a_time(msgs, ctx - want, options)
        if len(ids) >= ctx:
            raise RequestError(f"the prompt is {len(ids)} tokens but the context holds {ctx}: shorten it")
        return ids, full - len(ids), min(want, ctx - len(ids))

    # --- admission -----------------------------------------------------------------------------
    def free_slot(self, prompt: list[int]) -> tuple[Slot, int] | None:
        """A free slot for `prompt` and how many of its positions are already cached there.

        The slot (free or busy) that shares the most with the prompt is its source. A free source
        is taken over when little of its own cache would be lost (a conversation's next turn);
        otherwise, when the model can, the shared positions are copied into the least recently
        used free slot, so that two conversations with the same system prompt, or concurrent
        requests sharing a prefix, do not evict each other's caches."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        copy = getattr(self.model, "copy_positions", None)
        pool = self.slots if copy is not None else free
        src = max(pool, key=lambda s: (self.reuse_plan(s, prompt)[0], not s.busy, -s.last_used))
        reuse = self.reuse_plan(src, prompt)[0]
        if reuse <= 0:
            # nothing to reuse: take the least recently used slot, keep the others' caches
            return min(free, key=lambda s: s.last_used), 0
        lost = len(src.tokens) - common_prefix(src.tokens, prompt)
        if copy is None or (not src.busy and lost <= KEEP_LOSS):
            return src, reuse
        target = min(free, key=lambda s: s.last_used)
        if target is src:
            return src, reuse
        self._copy_prefix(src, target, reuse)
        return target, self.reuse_plan(target, prompt)[0]

    def _copy_prefix(self, src: Slot, dst: Slot, n: int) -> None:
        """dst's cache becomes src's first n positions, with what is known of how they were computed."""
        self.model.copy_positions(src.index, dst.index, n)
        dst.tokens, dst.dense, dst.approx = src.tokens[:n], min(src.dense, n), src.approx

    def reuse_plan(self, slot: Slot, prompt: list[int]) -> tuple[int, bool]:
        """(cached positions this prompt can start from, whether they only approximate a cold start).
        The last prompt token always runs, for its logits."""
        shared = max(min(common_prefix(slot.tokens, prompt), len(prompt) - 1), 0)
        if getattr(self.model, "rows_only", False):
            return shared, False  # every position computed as a decode step computes it
        boundary = len(prompt) // CHUNK * CHUNK  # a cold start computes [0, boundary) as dense chunks
        exact = min(shared, slot.dense, boundary) // CHUNK * CHUNK
        if not getattr(self.model, "rows_exact", False):
            return exact, False  # only full chunks are computed the same way twice
        if not slot.approx and slot.dense == boundary and shared >= boundary:
            return shared, False  # the same chunks, and rows after them, as a cold start
        if shared >= slot.dense + CONTINUE_MIN:
            return shared, True  # a conversation going on past a chunk boundary
        return exact, False

    def prefill(self, slot: Slot, prompt: list[int], start: int) -> Any:
        """Prefill prompt[start:] into the slot chunk by chunk; logits of the last position."""
        return self._prefill_all([(slot, prompt, start)])[0]

    def _prefill_all(self, work: list[tuple[Slot, list[int], int]]) -> list[Any]:
        # a start past the exact part, unless it is the exact continuation of the same chunks, is
        # the approximate reuse of reuse_plan: the slot keeps its exact part and is marked
        rows_only = getattr(self.model, "rows_only", False)
        approx = [not rows_only and start > slot.dense and (slot.approx or slot.dense != len(prompt) // CHUNK * CHUNK)
                  for slot, prompt, start in work]
        for slot, _, start in work:
            slot.tokens = slot.tokens[:start]
            slot.dense = min(slot.dense, start)
        with _inference():
            many = getattr(self.model, "prefill_many", None)
            if many is not None:  # the fast model: one pass per layer over every chunk of every prompt
                out = many([(slot.index, prompt[start:], start) for slot, prompt, start in work], CHUNK)
            else:
                out = [self._prefill_chunks(slot.index, prompt, start) for slot, prompt, start in work]
        for (slot, prompt, _), rough in zip(work, approx):
            slot.tokens = list(prompt)
            if rough:
                slot.approx = True  # `dense` still ends the exact part
            else:
                slot.dense, slot.approx = len(prompt) // CHUNK * CHUNK, False
        return out

    def _prefill_chunks(self, index: int, prompt: list[int], start: int) -> Any:
        import torch  # models without prefill_many are torch's (transformers' fallback)

        ids = torch.tensor(prompt, dtype=torch.long)
        logits = None
        for begin in range(start, len(prompt), CHUNK):
            logits = self.model.prefill(index, ids[begin : min(begin + CHUNK, len(prompt))], begin)
        assert logits is not None
        return logits

    @property
    def has_free_slot(self) -> bool:
        return any(not s.busy for s in self.slots)

    def admit(self, jobs: list[Job]) -> None:
        """Tokenize, fit, prefill (reusing cached prefixes) and emit each job's first token. Jobs
        that arrive together are prefilled together (the model shares work across them)."""
        ready = [p for p in (self._prepare(job) for job in jobs) if p is not None]
        if not ready:
            return
        tp = time.perf_counter()
        ready = self._share_prefixes(ready)
        if self.active and getattr(self.model, "rows_only", False) and hasattr(self.model, "step_rows"):
            # others are streaming: long prompts go in pieces with their steps (see PIECE)
            for seq, reuse in [(seq, reuse) for seq, reuse in ready if len(seq.prompt) - reuse > PIECE]:
                seq.slot.tokens = seq.slot.tokens[:reuse]
                seq.slot.dense = min(seq.slot.dense, reuse)
                seq.filling, seq.admitted = True, tp
                self.active.append(seq)
            ready = [(seq, reuse) for seq, reuse in ready if not seq.filling]
            if not ready:
                return
        logits = self._prefill_all([(seq.slot, seq.prompt, reuse) for seq, reuse in ready])
        elapsed = time.perf_counter() - tp
        for (seq, _), row in zip(ready, logits):
            seq.usage.prefill_s = elapsed
            self.active.append(seq)
            self._accept(seq, seq.sampler(row, seq.history))
            if seq.usage.ttft_s == 0.0:
                seq.usage.ttft_s = time.perf_counter() - seq.job.submitted

    def shareable(self, a: list[int], b: list[int]) -> int:
        """Leading positions of prompts a and b that one prefill can compute for both, exactly as
        each one's cold start would (the last token of each always runs, for its logits)."""
        n = min(common_prefix(a, b), len(a) - 1, len(b) - 1)
        if n <= 0 or getattr(self.model, "rows_only", False):
            return max(n, 0)
        chunks = n // CHUNK * CHUNK
        # a lone prefix runs its partial chunk as rows; so does a cold start of a and of b only when
        # that chunk is their last (partial) one, and only the kernel computes rows exactly
        same_tail = len(a) // CHUNK * CHUNK == chunks == len(b) // CHUNK * CHUNK
        return n if same_tail and getattr(self.model, "rows_exact", False) else chunks

    def _share_prefixes(self, ready: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Prompts admitted together that begin alike (one system prompt, a shared preamble) have
        their common prefix computed once: a leader prefills it in its slot, the others copy those
        positions into theirs. Each answer stays the one its prompt gets alone."""
        if not hasattr(self.model, "copy_positions") or len(ready) < 2:
            return ready
        follows: dict[int, tuple[int, int]] = {}  # follower -> (leader, shared positions)
        for j, (seq, reuse) in enumerate(ready):
            best = max(((self.shareable(ready[i][0].prompt, seq.prompt), i) for i in range(j) if i not in follows),
                       default=(0, -1))
            if best[0] - reuse >= SHARE_MIN:
                follows[j] = (best[1], best[0])
        if not follows:
            return ready
        upto: dict[int, int] = {}  # leader -> how far its prompt runs in the first pass
        for i, n in follows.values():
            upto[i] = max(upto.get(i, 0), n)
        first = [(ready[i][0].slot, ready[i][0].prompt[:n], ready[i][1]) for i, n in upto.items() if n > ready[i][1]]
        if first:  # else the leaders' caches hold the shared part already
            self._prefill_all(first)
        out = list(ready)
        for i in upto:
            seq = ready[i][0]
            out[i] = (seq, self.reuse_plan(seq.slot, seq.prompt)[0])
        for j, (i, n) in follows.items():
            seq = ready[j][0]
            self._copy_prefix(ready[i][0].slot, seq.slot, n)
            reuse = self.reuse_plan(seq.slot, seq.prompt)[0]
            seq.usage.cached_tokens = reuse  # computed once for all of them, not for this request
            out[j] = (seq, reuse)
        return out

    def _prepare(self, job: Job) -> tuple[Sequence, int] | None:
        """Prompt, slot and per-request state; None when the job already ended (bad request, no room)."""
        t0 = time.perf_counter()
        req = job.request
        try:
            prompt, dropped, limit = self.build_prompt(req)
            sampler = self._sampler(req)
        except RequestError as exc:
            job.stream._finish(Result("", "error", Usage(), error=str(exc), model=self.lm.name, error_kind="request"))
            return None
        picked = self.free_slot(prompt)
        assert picked is not None, "admit() needs a free slot per job"
        slot, reuse = picked
        slot.busy = True
        usage = Usage(
            prompt_tokens=len(prompt), cached_tokens=reuse, dropped_tokens=dropped,
            context_length=self.context_limit(req), queue_s=t0 - job.submitted, load_s=job.load_s,
        )
        job.stream.prompt_tokens, job.stream.cached_tokens = len(prompt), reuse
        seq = Sequence(
            job=job, slot=slot, prompt=prompt, sampler=sampler,
            decoder=IncrementalDecoder(self.tok, skip_special_tokens=True,
                                       hidden=self._hidden_tools if req.tools else self._hidden),
            stopper=StopMatcher(req.params.stop), usage=usage, history=list(prompt), limit=limit,
            splitter=self._splitter(req, prompt),
            tool_parser=self._tool_parser(req), logprobs=[] if req.logprobs is not None else None,
        )
        if limit <= 0:
            self._finish(seq, "length")
            return None
        return seq, reuse

    # --- decoding ------------------------------------------------------------------------------
    def step(self) -> None:
        """One decode step for every active sequence (cancelled ones leave first)."""
        for seq in [s for s in self.active if s.job.stream.cancelled]:
            self._finish(seq, "cancelled")
        if not self.active:
            return
        if any(s.filling for s in self.active):
            self._step_with_pieces()
            return
        batch = list(self.active)
        t0 = time.perf_counter()
        slots = [s.slot.index for s in batch]
        tokens = [s.last_token for s in batch]
        positions = [len(s.slot.tokens) for s in batch]
        with _inference():
            logits = _rows(self.model.decode(slots, tokens, positions))
        self._advance(batch, logits, t0)

    def _advance(self, batch: list[Sequence], logits: np.ndarray, t0: float) -> None:
        """The decode rows of a step are done: each sequence's last token joins its slot and the
        next one is picked from its row of logits."""
        for seq in batch:
            seq.slot.tokens.append(seq.last_token)
        if all(s.sampler.picks_best and not s.sampler.needs_penalties for s in batch):
            picks = greedy(logits)  # one op for the whole batch
        else:
            picks = [s.sampler(logits[i], s.history) for i, s in enumerate(batch)]
        elapsed = time.perf_counter() - t0
        for seq, token in zip(batch, picks):
            seq.usage.decode_s += elapsed
            self._accept(seq, int(token))

    def _step_with_pieces(self) -> None:
        """One kernel call: a decode row for each streaming sequence and the next PIECE prompt rows
        of those still prefilling; a prompt that ends here gives its first token."""
        decoding = [s for s in self.active if not s.filling]
        slots = [s.slot.index for s in decoding]
        tokens = [s.last_token for s in decoding]
        positions = [len(s.slot.tokens) for s in decoding]
        logit_rows = list(range(len(decoding)))
        pieces, budget = [], PIECE
        for seq in [s for s in self.active if s.filling]:
            start = len(seq.slot.tokens)
            n = min(budget, len(seq.prompt) - start)
            if n <= 0:
                break
            slots += [seq.slot.index] * n
            tokens += seq.prompt[start : start + n]
            positions += list(range(start, start + n))
            done = start + n == len(seq.prompt)
            if done:
                logit_rows.append(len(slots) - 1)
            pieces.append((seq, start + n, done))
            budget -= n
        t0 = time.perf_counter()
        with _inference():
            logits = _rows(self.model.step_rows(slots, tokens, positions, logit_rows))
        if decoding:
            self._advance(decoding, logits[: len(decoding)], t0)
        row = len(decoding)
        for seq, end, done in pieces:
            seq.slot.tokens = seq.prompt[:end]
            if done:  # as _prefill_all leaves a slot, then as admit() goes on
                seq.filling = False
                seq.slot.dense, seq.slot.approx = len(seq.prompt) // CHUNK * CHUNK, False
                seq.usage.prefill_s = time.perf_counter() - seq.admitted
                self._accept(seq, seq.sampler(logits[row], seq.history))
                row += 1

    def _tool_parser(self, req: GenerationRequest) -> ToolCallParser | None:
        """Calls of the request's tools, in the formats the template shows."""
        if not req.tools:
            return None
        names = frozenset(t["function"]["name"] for t in req.tools)
        if req.tool_choice and req.tool_choice != "required":  # a named tool: only its calls count
            names = frozenset({req.tool_choice}) & names or names
        return ToolCallParser(names, self._tool_formats)

    def _splitter(self, req: GenerationRequest, prompt: list[int]) -> ThinkSplitter | None:
        """A reasoning model's answer is split; a raw prompt's is the caller's to read."""
        if not self.thinks or req.raw:
            return None
        return ThinkSplitter(inside=opens_thinking(self.tok.decode(prompt[-8:])))

    def _emit(self, seq: Sequence, text: str, token: int, final: bool = False) -> None:
        """New text of an answer to its stream, the reasoning apart where the model reasons
        (`final`: the answer ends, and what the splitter held back comes out)."""
        thinking, reasoning, called = "", False, False
        if seq.splitter is not None:
            was_thinking = seq.splitter.state == "think"
            thinking, text = seq.splitter.feed(text)
            reasoning = token >= 0 and (was_thinking or seq.splitter.state == "think")  # (the tags count too)
            if reasoning:
                seq.usage.reasoning_tokens += 1
            if final:
                more = seq.splitter.flush()
                thinking, text = thinking + more[0], text + more[1]
        if seq.tool_parser is not None:
            given = text
            text = seq.tool_parser.feed(text) + (seq.tool_parser.flush() if final else "")
            called = bool(given) and not text  # the tokens went into a call
        first = not seq.text
        if thinking:
            seq.thinking.append(thinking)
        if text:
            seq.text.append(text)
        picked = self._logprobs_of(seq, text, first, drop=reasoning or called)
        if text or thinking:
            seq.job.stream._put(TokenEvent(text, token, thinking, picked))

    def _logprobs_of(self, seq: Sequence, text: str, first: bool, drop: bool) -> list[Any]:
        """The tokens (with their log-probabilities) whose text is `text`: none while the model
        reasons or writes a call (only the answer's tokens count, as OpenAI's), and the answer's
        first tokens as the answer reads (blank space before it dropped, a SentencePiece token's
        leading space stripped as the decoder strips it)."""
        if seq.logprobs is None:
            return []
        if drop:
            seq.sampler.take()
            return []
        if not text:
            return []  # held back: they go out with the text they make
        picked = seq.sampler.take()
        if first:
            while picked and not picked[0].token.strip() and not text.startswith(picked[0].token):
                picked.pop(0)
            head = picked[0] if picked else None
            if head is not None and head.token.startswith(" ") and not text.startswith(" "):
                picked[0] = dataclasses.replace(head, token=head.token[1:], bytes=head.bytes[1:] if head.bytes[:1] == [32] else head.bytes)
        seq.logprobs.extend(picked)
        return picked

    def _sampler(self, req: GenerationRequest) -> Any:
        sampler: Any = Sampler(req.params)
        if req.format == "json":
            from influence_tui.engine.constrain import JsonSampler, vocabulary

            sampler = JsonSampler(sampler, vocabulary(self.tok), self.eos, schema_state(req.json_schema),
                                  self._tool_openers if req.tools else frozenset())
        if req.logit_bias:
            from influence_tui.engine.constrain import Biased

            beyond = [i for i in req.logit_bias if not 0 <= i < self.tok.vocab_size]
            if beyond:
                raise RequestError(f"logit_bias names token {beyond[0]}, beyond this model's vocabulary "
                                   f"(0 to {self.tok.vocab_size - 1})")
            sampler = Biased(sampler, req.logit_bias)
        if req.tools and req.tool_choice and self._tool_openers:
            from influence_tui.engine.constrain import CallFirst

            sampler = CallFirst(sampler, self._tool_openers)
        if req.logprobs is not None:
            from influence_tui.engine.logprobs import MAX_TOP, LogprobSampler, token_texts

            if not 0 <= req.logprobs <= MAX_TOP:
                raise RequestError(f"top_logprobs must be from 0 to {MAX_TOP}")
            sampler = LogprobSampler(sampler, req.logprobs, token_texts(self.tok))
        return sampler

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated += 1
        seq.history.append(token)
        seq.last_token = token
        params = seq.job.request.params
        ended = token in self.eos or (token in self._fim_ends and seq.job.request.suffix is not None)
        if ended and not params.ignore_eos:
            if seq.logprobs is not None and seq.sampler.pending:
                seq.sampler.pending.pop()  # the end of the answer is not one of its tokens (held text's are)
            self._finish(seq, "stop")
            return
        text = seq.stopper.feed(seq.decoder.push(token))
        if text:
            self._emit(seq, text, token)
        if seq.usage.ttft_s == 0.0:
            seq.usage.ttft_s = time.perf_counter() - seq.job.submitted
        if seq.stopper.stopped or getattr(seq.sampler, "complete", False):  # JSON mode: the object closed
            self._finish(seq, "stop")
        elif seq.generated >= seq.limit or len(seq.slot.tokens) + 1 >= self.context_limit(seq.job.request):
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason != "stop" or not seq.stopper.stopped:
            # an answer cut off mid-character (length, cancel) drops the partial bytes, not shows U+FFFD
            tail = seq.stopper.feed(seq.decoder.flush().rstrip("\ufffd")) + seq.stopper.flush()
            if tail:
                self._emit(seq, tail, -1)
        if seq.splitter is not None or seq.tool_parser is not None:
            self._emit(seq, "", -1, final=True)
        seq.usage.completion_tokens = seq.generated
        seq.slot.busy = False
        seq.slot.last_used = time.perf_counter()
        if seq in self.active:
            self.active.remove(seq)
        seq.job.stream._finish(Result("".join(seq.text), reason, seq.usage, model=self.lm.name,  # type: ignore[arg-type]
                                      context=list(seq.history), thinking="".join(seq.thinking),
                                      tool_calls=seq.tool_parser.calls if seq.tool_parser else [],
                                      logprobs=seq.logprobs, stop_sequence=seq.stopper.matched))

    def cancel_all(self, reason: str = "cancelled") -> None:
        for seq in list(self.active):
            self._finish(seq, reason)

    def warmup(self, n_tokens: int) -> None:
        """A few decode steps right after load so the first real request does not pay for
        one-time costs (allocations, kernel selection, the chat template's compilation)."""
        if n_tokens <= 0:
            return
        slot = self.slots[0]
        ids = self.tok.encode("Hello", add_special_tokens=True) or [0]
        try:  # the chat template's first render compiles it (jinja2: ~0.1 s with its import)
            self._render([{"role": "user", "content": "Hello"}])
        except RequestError:
            pass
        with _inference():
            logits = self.model.prefill(slot.index, list(ids), 0)
            tokens = list(ids)
            for _ in range(n_tokens):
                nxt = greedy(logits)[0]
                logits = self.model.decode([slot.index], [nxt], [len(tokens)])[0]
                tokens.append(nxt)
        slot.forget()  # a dense prefill of a short prompt: not what a request would reuse
