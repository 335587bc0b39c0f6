"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded draws.

One `Sampler` per request (it owns the request's random generator, so the same seed and input
give the same text whatever else is in the batch). A sampled pick is one call into the kernel
library (`native.sample`) where it is built; the numpy functions here do the same elsewhere.
Also `StopMatcher`, which finds stop strings across token boundaries and holds back text that
might be the start of one.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from influence_tui.engine import native
from influence_tui.params import GenerationParams

if TYPE_CHECKING:  # torch only where the logits are torch's: the kernel's model hands numpy rows
    import torch


def greedy(logits: "torch.Tensor | np.ndarray") -> list[int]:
    """The index of each row's largest logit (the first one on ties; NaN counts as largest), for
    float32 logits [vocab] or [rows, vocab]: numpy, or a torch tensor on the CPU. numpy's argmax is
    vectorised where torch's CPU argmax is not: ~6 us a row instead of ~80 (a step of 8 streams
    spent 0.35 ms in it)."""
    if not isinstance(logits, np.ndarray):
        if logits.device.type != "cpu" or str(logits.dtype) != "torch.float32" or logits.requires_grad:
            return logits.reshape(-1, logits.shape[-1]).argmax(dim=-1).tolist()
        logits = logits.numpy()
    return logits.reshape(-1, logits.shape[-1]).argmax(axis=1).tolist()


class SamplerLayer:
    """A layer around a request's sampler (logit_bias, a forced call tag, log-probabilities): it
    sees each row of logits first and hands on the rest (needs_penalties, complete, …). Every row
    goes through it: the batched greedy shortcut, which skips samplers, is off."""

    picks_best = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Sampler:
    def __init__(self, params: GenerationParams) -> None:
        self.p = params
        self.seed = params.seed if params.seed not in (None, -1) else random.randrange(2**63)  # -1: random
        # any integer is a seed (clients send negative or 128-bit ones): folded into 64 bits
        self.rng = np.random.Generator(np.random.PCG64(self.seed % 2**64))
        self.generated: Counter[int] = Counter()

    @property
    def picks_best(self) -> bool:
        """Greedy: no temperature, or settings that leave only the best token."""
        p = self.p
        return p.greedy or p.temperature < 1e-4 or p.top_p <= 0.0 or p.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        p = self.p
        return _repeat_penalised(p) or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def apply_penalties(self, logits: "torch.Tensor", history: list[int]) -> "torch.Tensor":
        """llama.cpp's repeat penalty over the last `repeat_last_n` tokens (prompt included);
        OpenAI's presence/frequency penalties over the generated tokens. In place."""
        _penalise(logits.numpy(), self.p, history, self.generated)
        return logits

    def __call__(self, logits: "torch.Tensor | np.ndarray", history: list[int]) -> int:
        """Pick the next token from float32 logits [vocab] (on CPU). `history` = prompt + generated ids."""
        x = _as_numpy(logits)
        if self.picks_best:
            if self.needs_penalties:
                x = x.copy()
                _penalise(x, self.p, history, self.generated)
            token = int(x.argmax())
        else:
            u = self.rng.random()  # one draw a token, whichever path picks it: a seed's draws stay the same
            token = self._native_pick(x, history, u)
            if token is None:
                # numpy, not torch: on one row of ~50k logits torch's CPU ops cost ~10x more (its
                # topk alone took 0.5 ms, a sampled token ~1 ms in all; a decode step is ~4 ms)
                if self.needs_penalties:
                    x = x.copy()
                    _penalise(x, self.p, history, self.generated)
                token = self._pick(x, u)
        self.generated[token] += 1
        return token

    def _native_pick(self, x: np.ndarray, history: list[int], u: float) -> int | None:
        """The kernel library's sampler: one C call, where ~25 numpy calls cost ~0.6 ms a token
        right after a decode step (the caches hold weights then, not numpy). None where it is
        unavailable or has nothing to draw from."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            return None
        p = self.p
        overrides = _penalties(x, p, history, self.generated) if self.needs_penalties else {}
        return native.sample(x, overrides, p.temperature, p.top_k or 0, p.top_p, p.min_p, u)

    def _pick(self, x: np.ndarray, u: float) -> int:
        """numpy's sampler: top-k/min-p/top-p candidates, then the draw at u."""
        picked = _candidates(x, self.p)
        if picked is None:
            return int(x.argmax())  # penalties pushed everything to -inf: fall back to greedy
        probs, ids = picked
        return int(ids[draw(probs, u)])


def _as_numpy(logits: "torch.Tensor | np.ndarray") -> np.ndarray:
    """A row of logits as float32 numpy, without copying a CPU float32 tensor (each torch call
    costs ~20 us right after a decode step)."""
    if isinstance(logits, np.ndarray):
        return logits
    if logits.device.type != "cpu" or str(logits.dtype) != "torch.float32" or logits.requires_grad:
        logits = logits.detach().float().cpu()
    return logits.numpy()


def _repeat_penalised(p: GenerationParams) -> bool:
    """A repeat penalty applies: 1 is off, and so is 0 (clients send it to mean off; dividing by
    it would make every recent token certain)."""
    return p.repeat_penalty > 0.0 and p.repeat_penalty != 1.0 and p.repeat_last_n > 0


def _penalties(x: np.ndarray, p: GenerationParams, history: list[int], generated: Counter[int]) -> dict[int, float]:
    """The penalised logits of the tokens that have any: llama.cpp's repeat penalty over the last
    `repeat_last_n` tokens, then OpenAI's presence/frequency penalties over the generated ones."""
    out: dict[int, float] = {}
    if _repeat_penalised(p) and history:
        for i in set(history[-p.repeat_last_n:]):
            v = float(x[i])
            out[i] = v / p.repeat_penalty if v > 0 else v * p.repeat_penalty
    if p.presence_penalty or p.frequency_penalty:
        for i, n in generated.items():
            out[i] = out.get(i, float(x[i])) - (p.presence_penalty + p.frequency_penalty * n)
    return out


def _penalise(x: np.ndarray, p: GenerationParams, history: list[int], generated: Counter[int]) -> None:
    """_penalties written into x."""
    for i, v in _penalties(x, p, history, generated).items():
        x[i] = v


# Thresholds below the best token (as fractions of its probability) tried before a full sort: the
# tokens above one are a prefix of the sorted order, so when they hold top_p of the mass (or k
# tokens) only they need sorting: usually a few hundred of ~50k.
HEAD_THRESHOLDS = (2.0**-10, 2.0**-20, 2.0**-40)


def _head(v: np.ndarray, enough) -> tuple[np.ndarray, np.ndarray]:
    """A prefix of the probabilities v in descending order (ties in index order) and their
    indices, long enough that enough(values) holds; every non-zero one when none is."""
    top = float(v.max())
    for f in HEAD_THRESHOLDS:
        ids = np.flatnonzero(v >= top * f)
        if enough(v[ids]):
            break
    else:
        ids = np.flatnonzero(v > 0)
    order = np.argsort(-v[ids], kind="stable")
    return v[ids][order], ids[order]


# Tokens whose logit (after temperature) is more than CUT below the best one are left out before
# the softmax: each has under e^-30 of the best one's probability, all ~50k of them together under
# 5e-9 of the mass, below float32's resolution of the rest (and no exp() gives a denormal).
CUT = 30.0


def _candidates(x: np.ndarray, p: GenerationParams) -> tuple[np.ndarray, np.ndarray] | None:
    """Temperature, then top-k, min-p and top-p on float32 logits (not modified): the kept tokens'
    probabilities (normalised) and ids. None when nothing is left to draw from."""
    top = float(x.max())
    if not math.isfinite(top):  # a NaN, or every token at -inf (penalties, masks)
        return None
    t = float(p.temperature)
    ids = np.flatnonzero(x >= top - CUT * t)
    probs = np.exp((x[ids] - np.float32(top)) / np.float32(t))
    probs /= probs.sum()
    if p.top_k and p.top_k < probs.size:
        k = p.top_k
        best, _ = _head(probs, lambda v: v.size >= k)
        if best.size >= k:  # (fewer non-zero ones: nothing to drop)
            probs[probs < best[k - 1]] = 0.0  # ties with the k-th stay
            probs /= probs.sum()
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    if 0.0 < p.top_p < 1.0:
        best, order = _head(probs, lambda v: float(v.sum(dtype=np.float64)) >= p.top_p)
        keep = np.cumsum(best, dtype=np.float64) - best < p.top_p  # the token that crosses top_p stays
        probs, ids = best[keep], ids[order[keep]]
    else:
        nonzero = probs > 0
        probs, ids = probs[nonzero], ids[nonzero]
    total = float(probs.sum(dtype=np.float64))
    if not total > 0.0 or total == float("inf"):
        return None
    return probs / np.float32(total), ids


def draw(probs: np.ndarray, u: float) -> int:
    """The index i where the running sum of probs (>= 0, not all 0) first exceeds u * their total
    (inverse CDF, u in [0, 1)). By blocks of 256: numpy's cumsum is a scalar loop (~0.2 ms over a
    whole vocabulary), block sums are vectorised."""
    n, B = probs.size, 256
    if n <= 4 * B:
        blocks, cb = probs.reshape(1, -1), np.array([probs.sum(dtype=np.float64)])
    else:
        blocks = np.pad(probs, (0, -n % B)).reshape(-1, B)
        cb = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
    target = u * cb[-1]
    j = min(int(np.searchsorted(cb, target, side="right")), len(cb) - 1)
    while cb[j] == (cb[j - 1] if j else 0.0):  # rounding landed on an empty block: the last full one
        j -= 1
    inner = np.cumsum(blocks[j], dtype=np.float64)
    i = int(np.searchsorted(inner, target - (cb[j - 1] if j else 0.0), side="right"))
    i = min(i, int(np.flatnonzero(blocks[j])[-1]))  # past the end by rounding: its last kept token
    return j * blocks.shape[1] + i


def candidates(logits: "torch.Tensor", p: GenerationParams) -> "tuple[torch.Tensor, torch.Tensor] | None":
    """`_candidates` on a torch row of logits: (probabilities, ids) as tensors, or None."""
    import torch

    picked = _candidates(logits.detach().float().cpu().numpy(), p)
    if picked is None:
        return None
    probs, ids = picked
    return torch.from_numpy(probs), torch.from_numpy(ids)


def filtered_probs(logits: "torch.Tensor", p: GenerationParams) -> "torch.Tensor | None":
    """The full-vocabulary distribution a Sampler draws from (for tests and inspection)."""
    import torch

    picked = candidates(logits, p)
    if picked is None:
        return None
    probs, ids = picked
    return torch.zeros(logits.numel()).scatter_(0, ids, probs)


class StopMatcher:
    """Feed text deltas; get back what is safe to show. Stops at the first stop string, which is
    never emitted. Text that could be the start of a stop string is held until it cannot be."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the answer (Anthropic's stop_sequence)

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        if self.stopped:
            return ""
        text = self.pending + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.matched = next(s for s in self.stops if text.find(s) == cut)
            self.pending = ""
            return text[:cut]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
