"""A small Llama-family decoder (llama, mistral, qwen2, qwen3) with a static, slot-based KV cache.

In the style of gpt-fast: few ops per layer (fused QKV and gate/up projections, one SDPA call over
the cache), activations kept 2-D ([tokens, features]) so the weight-only quantised linears of
`quant.py` apply directly, plain Python objects instead of nn.Modules (less call overhead per op).

Q and K weights are held in the *interleaved* RoPE layout (pairs 2i, 2i+1 rotate together, as in
Meta's checkpoints and llama.cpp's GGUF): the loader permutes Hugging Face's rotate-half layout
into it. Attention scores do not change (q and k are permuted alike within each head), and RoPE
becomes one complex multiplication.
"""

from __future__ import annotations

import math
import mmap
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from influence_tui.engine import rope
from influence_tui.engine.base import ModelConfig
from influence_tui.engine.governor import ThreadGovernor
from influence_tui.engine.native import IntRows, NativeStep, has_matrix_units, head_lanes
from influence_tui.engine.quant import (
    FloatLinear,
    Int4Linear,
    Int8Linear,
    Q4Linear,
    dense_weights,
    linear_from_tensors,
    linear_tensors,
)

Linear = FloatLinear | Int8Linear | Int4Linear | Q4Linear


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] (float64), with llama3 / linear scaling applied."""
    return torch.from_numpy(rope.inv_freq(cfg))


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    q_norm: torch.Tensor | None = None  # Qwen3's per-head norms of q and k (float32 [head_dim])
    k_norm: torch.Tensor | None = None


class Embedding:
    """Token embedding table: float, or int8/int4 rows shared with a tied quantised lm_head."""

    def __init__(self, table: torch.Tensor | Int8Linear | Int4Linear) -> None:
        self.table = table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.table, torch.Tensor):
            return F.embedding(ids, self.table)
        return self.table.rows(ids)


class LlamaModel:
    """Implements `engine.base.CausalLM`."""

    def __init__(
        self,
        cfg: ModelConfig,
        embed: Embedding,
        layers: list[Layer],
        norm: torch.Tensor,
        lm_head: Linear,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = dtype
        self.device = device
        self.vocab_size = cfg.vocab_size
        self.context_length = cfg.context_length
        self.max_batch = 0
        self.max_seq = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._buffers: list[mmap.mmap] = []
        self._rope_inv = rope_inv_freq(cfg).float().to(device)
        self._rope: torch.Tensor | None = None  # complex64 [max_seq, head_dim/2]
        self.kv_cache: list[torch.Tensor] = []
        self._arange = torch.arange(0)
        self._norms: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._qk_weights: dict[int, torch.Tensor] = {}  # Qwen3's head norms, per layer (see _head_norms)
        self._final_norm = norm
        self._norm_eps = torch.tensor(0.0)
        self._governors: dict[int, ThreadGovernor] = {}
        self._native: NativeStep | None = None  # the C decode step, when every piece fits it
        self._head_lanes: torch.Tensor | None = None  # the int8 lm_head in the kernel's layout
        # with AMX, oneDNN's bf16 chunks should outrun the kernel's rows (~9x llama.cpp's prefill on
        # the speed issue's machine; not measured here, where no CPU has AMX)
        self._dense_prefill = has_matrix_units()

    # -- cache ------------------------------------------------------------------------------
    def allocate(self, max_batch: int, max_seq: int) -> None:
        max_seq = min(max_seq, self.context_length)
        cfg = self.cfg
        # one tensor per layer holds K and V: [slot, 2, kv heads, positions, head_dim], so that a
        # decode step writes both with one copy
        shape = (max_batch, 2, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.kv_cache, self.k_cache, self.v_cache, self._buffers = [], [], [], []
        self.kv_cache = [self._zeros(shape) for _ in self.layers]
        self.k_cache = [kv[:, 0] for kv in self.kv_cache]
        self.v_cache = [kv[:, 1] for kv in self.kv_cache]
        self.max_batch, self.max_seq = max_batch, max_seq
        pos = torch.arange(max_seq, dtype=torch.float32, device=self.device)
        angles = torch.outer(pos, self._rope_inv)
        self._rope = torch.polar(torch.ones_like(angles), angles)
        # the kernel's tables from numpy, as the torch-free model builds them (the same bits)
        cos, sin = rope.kernel_tables(cfg, max_seq)
        self._rope_cos, self._rope_sin = torch.from_numpy(cos).to(self.device), torch.from_numpy(sin).to(self.device)
        hd = cfg.head_dim
        pair = torch.arange(hd // 2, device=self.device)
        even, odd = 2 * pair, 2 * pair + 1  # flat indices into a [D, D] matrix (row: input, col: output)
        self._rope_idx = (even * hd + even, odd * hd + odd, even * hd + odd, odd * hd + even)
        self._slot_views: dict[int, list[torch.Tensor]] = {}
        self._arange = torch.arange(max_seq, device=self.device)
        self._native = NativeStep.for_model(self)

    @property
    def native(self) -> bool:
        """Whether decode steps run in the C kernel."""
        return self._native is not None

    @property
    def rows_only(self) -> bool:
        """True when whole prompts run as rows of the decode kernel (on CPUs without matrix units
        they outrun the dense bf16 matmuls: 1.4-2.3x at 128-1,800 tokens). Every position then has
        the K/V a decode step gives it, whatever ran with it, so any cached prefix is exact."""
        return self._native is not None and not self._dense_prefill

    def prefer_dense_prefill(self, dense: bool) -> None:
        """Full chunks as dense matmuls even where rows are faster (tests of that path)."""
        self._dense_prefill = dense

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        """Copy the K/V of positions [0, n) from slot `src` to slot `dst` (a shared prefix, as it
        was computed: the copy is bit for bit what the source slot holds)."""
        self._check_cache()
        if not (0 <= src < self.max_batch and 0 <= dst < self.max_batch and 0 <= n <= self.max_seq):
            raise ValueError(f"cannot copy {n} positions from slot {src} to slot {dst}")
        for kv in self.kv_cache:
            kv[dst, :, :, :n] = kv[src, :, :, :n]

    def use_native(self, enabled: bool) -> bool:
        """Switch decode steps between the C kernel and the torch path (the reference the tests
        compare it with); returns whether the kernel is now in use."""
        self._native = NativeStep.for_model(self) if enabled and self.kv_cache else None
        return self._native is not None

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        # An anonymous mmap is zero-filled lazily by the OS in 4 KiB pages: a large cache costs
        # memory only where slots are written. (numpy/calloc would do the same, but numpy asks
        # for 2 MiB huge pages, which makes every touched head cost 2 MiB.)
        nbytes = math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()
        buf = mmap.mmap(-1, max(nbytes, 1))
        self._buffers.append(buf)
        return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(self.dtype).view(shape)

    def _check_cache(self) -> None:
        if not self.k_cache:
            raise RuntimeError("allocate() the KV cache before running the model")

    # -- forward ----------------------------------------------------------------------------
    def _rope_apply(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim] in interleaved layout; rot: complex [tokens, 1, head_dim/2]."""
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * rot).flatten(-2).to(self.dtype)

    def _norm_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the two RMSNorm weights in float32, pre-multiplied by sqrt(dim) (see `_rms_norm`)."""
        if self._norms is None:
            root = math.sqrt(self.cfg.dim)
            self._norms = [(l.attn_norm.float() * root, l.ffn_norm.float() * root) for l in self.layers]
            self._final_norm = self.norm.float() * root
            self._norm_eps = torch.tensor(math.sqrt(self.cfg.dim * self.cfg.norm_eps), device=self.device)
        return self._norms

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm of the float32 residual stream, in the compute dtype: x * w / sqrt(mean(x^2) + eps)
        = x * (w sqrt(d)) / hypot(|x|, sqrt(d eps)). Four ops: F.rms_norm is a composite of ~9 on CPU
        (3x slower for one token, and for a 500-token prefill too)."""
        r = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self._norm_eps)
        return (x * w).div_(r).to(self.dtype)

    def _head_norms(self, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3: each q and k head of the fused QKV output [N, (H + 2 KV) D] RMS-normed (in float32,
        as transformers does) before RoPE; other models' qkv as it is."""
        layer = self.layers[i]
        if layer.q_norm is None or layer.k_norm is None:
            return qkv
        cfg = self.cfg
        n, heads = qkv.shape[0], cfg.n_heads + cfg.n_kv_heads
        qk = qkv[:, : cfg.q_size + cfg.kv_size].float().view(n, heads, cfg.head_dim)
        w = self._qk_weights.get(i)
        if w is None:  # every head's weight, q heads then k heads: made once
            w = self._qk_weights[i] = torch.cat((layer.q_norm.expand(cfg.n_heads, -1), layer.k_norm.expand(cfg.n_kv_heads, -1)))
        qk = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
        return torch.cat((qk.view(n, -1).to(qkv.dtype), qkv[:, cfg.q_size + cfg.kv_size :]), dim=1)

    def _forward(
        self,
        ids: torch.Tensor,
        rot: torch.Tensor,
        attend,  # (layer index, q [N, H, D], kv [N, 2, KV, D]) -> [N, H*D]
    ) -> torch.Tensor:
        self._norm_weights()
        x = self.embed(ids).float()
        for i in range(len(self.layers)):
            self._layer(i, x, rot, attend)
        return self._rms_norm(x, self._final_norm)

    def _layer(self, i: int, x: torch.Tensor, rot: torch.Tensor, attend) -> None:
        """One transformer block on the float32 residual stream x [N, dim], in place."""
        cfg = self.cfg
        nq, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qs, ks = cfg.q_size, cfg.kv_size
        attn_norm, ffn_norm = self._norm_weights()[i]
        layer = self.layers[i]
        n = x.shape[0]
        qkv = self._head_norms(i, layer.qkv(self._rms_norm(x, attn_norm)))
        qk = self._rope_apply(qkv[:, : qs + ks].view(n, nq + nkv, hd), rot)
        k = qk[:, nq:]
        v = qkv[:, qs + ks :].view(n, nkv, hd)
        x += layer.o(attend(i, qk[:, :nq], torch.stack((k, v), dim=1)))
        g, u = layer.gate_up(self._rms_norm(x, ffn_norm)).chunk(2, dim=-1)
        x += layer.down(F.silu(g).mul_(u))

    def prefill_chunked(self, slot: int, tokens: torch.Tensor, start_pos: int, chunk: int) -> torch.Tensor:
        """Logits of the last position, exactly as calling `prefill` on each `chunk`-aligned piece
        in turn (the same ops on the same rows), but layer by layer: each layer's low-bit weights
        are dequantised once for the whole prompt instead of once per piece."""
        return self.prefill_many([(slot, tokens, start_pos)], chunk)[0]

    @property
    def rows_exact(self) -> bool:
        """True when `prefill_many` runs the positions after a prompt's last full chunk as rows of
        the decode kernel: each such position, like every decoded one, then has the same K/V
        whatever else ran with it, so a cache holding them is as good as recomputing them."""
        return self._native is not None

    def prefill_many(self, jobs: list[tuple[int, torch.Tensor, int]], chunk: int) -> list[torch.Tensor]:
        """Several (slot, tokens, start_pos) prefills at once; each one's last-position logits.

        With the decode kernel and no matrix units (`rows_only`), every position runs as a kernel
        row. Otherwise full `chunk`-aligned pieces run layer by layer as dense matmuls, all prompts
        together (each layer's low-bit weights dequantised once); the same numbers as prefilling
        each piece alone. With the decode kernel (`rows_exact`), the positions after the last full
        chunk run as its rows; otherwise they are one more dense piece."""
        jobs = [(slot, torch.as_tensor(tokens, dtype=torch.long), start) for slot, tokens, start in jobs]
        dense, rows = [], []
        for slot, tokens, start in jobs:
            end = start + int(tokens.shape[0])
            cut = start if self.rows_only else max(start, end // chunk * chunk) if self.rows_exact else end
            dense.append((slot, tokens[: cut - start], start) if cut > start else None)
            rows.append((slot, tokens[cut - start :], cut) if cut < end else None)
        # logits from the dense part only where no rows follow it
        wanted = [r is None for d, r in zip(dense, rows) if d is not None]
        done = iter(self._prefill_dense([d for d in dense if d is not None], chunk, wanted))
        tails = iter(self._prefill_rows_many([r for r in rows if r is not None]))
        out = []
        for d, r in zip(dense, rows):
            last = next(done) if d is not None else None
            out.append(next(tails) if r is not None else last)
        return out

    def prefill_rows(self, slot: int, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Prefill as decode-kernel rows (the kernel's own batching): last-position logits [vocab]."""
        return self._prefill_rows_many([(slot, tokens, start_pos)])[0]

    def step_rows(self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int]) -> torch.Tensor:
        """One kernel call for rows of any slots at any positions (decode steps and pieces of prompts
        together; rows of one slot at consecutive positions): float32 logits [len(logit_rows), vocab].
        The kernel checks every slot, position and token (ValueError)."""
        assert self._native is not None
        return torch.from_numpy(self._native.decode(slots, tokens, positions, torch.get_num_threads(), logit_rows))

    def _prefill_rows_many(self, jobs: list[tuple[int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Several prompts' rows in one kernel call (each pass over the weights serves 8 rows,
        whichever prompts they belong to); each prompt's last-position logits."""
        if not jobs:
            return []
        slots, positions, last = [], [], []
        for slot, tokens, start in jobs:
            t = int(tokens.shape[0])
            if t < 1 or start < 0 or start + t > self.max_seq or not 0 <= slot < self.max_batch:
                raise ValueError(f"positions {start}..{start + t - 1} of slot {slot} do not fit the cache")
            slots.append(torch.full((t,), slot, dtype=torch.long))
            positions.append(torch.arange(start, start + t))
            last.append(sum(len(p) for p in positions) - 1)
        tokens = torch.cat([tokens for _, tokens, _ in jobs])
        assert self._native is not None
        logits = self._native.decode(torch.cat(slots), tokens, torch.cat(positions), torch.get_num_threads(), last)
        return list(torch.from_numpy(logits))

    def _prefill_dense(
        self, jobs: list[tuple[int, torch.Tensor, int]], chunk: int, logits: list[bool] | None = None
    ) -> list[torch.Tensor | None]:
        if not jobs:
            return []
        self._check_cache()
        assert self._rope is not None
        spans = []
        for slot, tokens, start in jobs:
            end = start + int(tokens.shape[0])
            if tokens.shape[0] < 1 or start < 0 or end > self.max_seq or not 0 <= slot < self.max_batch:
                raise ValueError(f"positions {start}..{end - 1} of slot {slot} do not fit the cache")
            edges = [start] + list(range((start // chunk + 1) * chunk, end, chunk)) + [end]
            spans.append(list(zip(edges[:-1], edges[1:])))
        self._norm_weights()
        with torch.inference_mode():
            xs = [self.embed(tokens.to(self.device)).float() for _, tokens, _ in jobs]
            for i, layer in enumerate(self.layers):
                with dense_weights(layer.qkv, layer.o, layer.gate_up, layer.down):
                    for (slot, _, start), x, pieces in zip(jobs, xs, spans):
                        for a, b in pieces:
                            self._layer(i, x[a - start : b - start], self._rope[a:b].unsqueeze(1), self._prefill_attend(slot, a, b))
            want = logits or [True] * len(xs)
            return [self.lm_head(self._rms_norm(x[-1:], self._final_norm)).float()[0] if w else None for x, w in zip(xs, want)]

    def _prefill_attend(self, slot: int, start_pos: int, end: int):
        """Attention for prefill rows start_pos..end-1 of one slot (writes their K/V first)."""
        t = end - start_pos
        if start_pos == 0:
            mask = None
        else:  # row i sees cache positions 0..start_pos+i
            cols = torch.arange(end, device=self.device)
            rows = torch.arange(start_pos, end, device=self.device)
            mask = cols[None, :] <= rows[:, None]

        def attend(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            c = self.kv_cache[i]
            c[slot, :, :, start_pos:end] = kv.permute(1, 2, 0, 3)
            if self._native is not None:  # the kernel's causal attention: ~2.5x faster than SDPA here
                out = self._native.prefill_attention(i, slot, start_pos, q)
                if out is not None:
                    return out
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                c[slot : slot + 1, 0, :, :end],
                c[slot : slot + 1, 1, :, :end],
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=True,
            )
            return o[0].transpose(0, 1).reshape(t, -1)

        return attend

    def prefill(self, slot: int, tokens: IntRows, start_pos: int, all_logits: bool = False) -> torch.Tensor:
        self._check_cache()
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        t = int(tokens.shape[0])
        end = start_pos + t
        if t < 1 or start_pos < 0 or end > self.max_seq:
            raise ValueError(f"positions {start_pos}..{end - 1} do not fit the cache of {self.max_seq}")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside 0..{self.max_batch - 1}")
        assert self._rope is not None
        rot = self._rope[start_pos:end].unsqueeze(1)
        attend = self._prefill_attend(slot, start_pos, end)

        with torch.inference_mode():
            h = self._forward(tokens.to(self.device), rot, attend)
            if not all_logits:
                h = h[-1:]
            logits = self.lm_head(h).float()
        return logits if all_logits else logits[0]

    def decode(self, slots: IntRows, tokens: IntRows, positions: IntRows) -> torch.Tensor:
        """One decode step: token b at position b of slot b, for each b (1-D integer tensors or
        lists of ints); float32 logits [B, vocab]."""
        if self._native is None:  # the kernel takes lists as they are; torch wants tensors
            slots, tokens, positions = (torch.as_tensor(v, dtype=torch.long) for v in (slots, tokens, positions))
            if self.device.type != "cpu":
                return self._decode(slots, tokens, positions)
        gov = self._governors.setdefault(len(tokens), ThreadGovernor())
        n, t0 = gov.threads(torch.get_num_threads()), time.perf_counter()
        torch_threads = self._native is None and n != gov.full  # the kernel takes its count per call
        if torch_threads:
            torch.set_num_threads(n)
        try:
            if self._native is not None:
                return torch.from_numpy(self._native.decode(slots, tokens, positions, n))
            return self._decode(slots, tokens, positions)
        finally:
            gov.record(time.perf_counter() - t0)
            if torch_threads:  # other work (prefill) keeps the caller's thread count
                torch.set_num_threads(gov.full)

    def _decode(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._check_cache()
        b = int(tokens.shape[0])
        if b == 1:
            return self._decode_one(int(slots[0]), tokens, int(positions[0]))
        slots = slots.to(self.device)
        positions = positions.to(self.device)
        length = int(positions.max()) + 1
        if length > self.max_seq or int(positions.min()) < 0:
            raise ValueError(f"a position is outside the cache of {self.max_seq}")
        if int(positions.min()) == length - 1:
            mask = None  # every row sees all `length` positions: SDPA without a mask is ~25% faster
        else:
            mask = (self._arange[None, :length] <= positions[:, None]).view(b, 1, 1, length)
        first = int(slots[0])
        # a run of consecutive slots is read as a view of the cache; otherwise gathered
        contiguous = first + b <= self.max_seq and bool(torch.equal(slots, self._arange[first : first + b]))
        cfg, dtype = self.cfg, self.dtype
        nq, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qk_size, qk_shape = cfg.q_size + cfg.kv_size, (b, nq + nkv, hd)
        rot = self._rotations(positions)  # [B, D, D]

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            r = torch.bmm(qkv[:, :qk_size].view(qk_shape).float(), rot)  # q and k rotated [B, H + KV, D]
            c = self.kv_cache[i]
            c[slots, 0, :, positions] = r[:, nq:].to(dtype)
            c[slots, 1, :, positions] = qkv[:, qk_size:].view(b, nkv, hd)
            cs = c[first : first + b, :, :, :length] if contiguous else c[slots, :, :, :length]
            q = r[:, :nq].unsqueeze(2).to(dtype)
            o = F.scaled_dot_product_attention(q, cs[:, 0], cs[:, 1], attn_mask=mask, enable_gqa=True)
            return o.view(b, -1)

        with torch.inference_mode():
            h = self._decode_forward(tokens.to(self.device), attend)
            return self.lm_head(h).float()

    def _decode_one(self, slot: int, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """decode() for one sequence: plain slices instead of index tensors, no mask."""
        if not 0 <= pos < self.max_seq:
            raise ValueError(f"a position is outside the cache of {self.max_seq}")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside 0..{self.max_batch - 1}")
        cfg, dtype = self.cfg, self.dtype
        nq, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qk_size, qk_shape = cfg.q_size + cfg.kv_size, (nq + nkv, hd)
        q_shape, v_shape = (1, nq, 1, hd), (nkv, hd)
        end = pos + 1
        caches = self._slot_caches(slot)  # [2, KV, S, D] each
        rot = self._rotations(torch.tensor([pos], device=self.device))[0]

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            r = torch.mm(qkv[0, :qk_size].view(qk_shape).float(), rot)  # q and k rotated [H + KV, D]
            c = caches[i]
            c[0, :, pos] = r[nq:]
            c[1, :, pos] = qkv[0, qk_size:].view(v_shape)
            c = c[:, :, :end]
            o = F.scaled_dot_product_attention(r[:nq].to(dtype).view(q_shape), c[0:1], c[1:2], enable_gqa=True)
            return o.view(1, -1)

        with torch.inference_mode():
            h = self._decode_forward(tokens.to(self.device), attend)
            return self.lm_head(h).float()

    def _slot_caches(self, slot: int) -> list[torch.Tensor]:
        views = self._slot_views.get(slot)
        if views is None:
            views = self._slot_views[slot] = [c[slot] for c in self.kv_cache]
        return views

    def _rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of a decode step as one float32 matrix per row, [B, D, D]: x @ R rotates the pairs
        (2i, 2i+1) of the interleaved layout by position * inv_freq[i]. One small matmul per layer
        then rotates all q and k heads (instead of ~9 ops through complex numbers)."""
        hd, b = self.cfg.head_dim, int(positions.shape[0])
        cos, sin = self._rope_cos[positions], self._rope_sin[positions]  # [B, D/2]
        rot = torch.zeros(b, hd * hd, device=self.device)
        i = self._rope_idx
        rot[:, i[0]] = cos  # out[2i] = x[2i] cos - x[2i+1] sin; out[2i+1] = x[2i] sin + x[2i+1] cos
        rot[:, i[1]] = cos
        rot[:, i[2]] = sin
        rot[:, i[3]] = -sin
        return rot.view(b, hd, hd)

    def _decode_forward(self, ids: torch.Tensor, attend) -> torch.Tensor:
        """Like `_forward`, for decode steps: attend(layer index, qkv) gets the fused QKV output
        [B, (H + 2 KV) D] and applies RoPE itself."""
        norms = self._norm_weights()
        x = self.embed(ids).float()
        for i, (layer, (attn_norm, ffn_norm)) in enumerate(zip(self.layers, norms)):
            x += layer.o(attend(i, self._head_norms(i, layer.qkv(self._rms_norm(x, attn_norm)))))
            g, u = layer.gate_up(self._rms_norm(x, ffn_norm)).chunk(2, dim=-1)
            x += layer.down(F.silu(g).mul_(u))
        return self._rms_norm(x, self._final_norm)

    def head_lanes(self) -> torch.Tensor:
        """The int8 lm_head as the C kernel reads it (`native.head_lanes`): read from the weights
        cache, or made once."""
        if self._head_lanes is None:
            assert isinstance(self.lm_head, Int8Linear)
            self._head_lanes = torch.from_numpy(head_lanes(self.lm_head.q.cpu().numpy()))
        return self._head_lanes

    def kernel_shaped(self) -> bool:
        """Q4 layers and an int8 lm_head: the weights the C kernel runs."""
        return isinstance(self.lm_head, Int8Linear) and all(
            isinstance(getattr(layer, name), Q4Linear) for layer in self.layers for name in self._LAYER_LINEARS)

    # -- (de)serialisation for the converted-weights cache ----------------------------------------
    _LAYER_LINEARS = ("qkv", "o", "gate_up", "down")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"norm": self.norm}
        table = self.embed.table
        out.update({"embed.weight": table} if isinstance(table, torch.Tensor) else linear_tensors(table, "embed"))
        if self.lm_head is not table and not (isinstance(self.lm_head, FloatLinear) and self.lm_head.weight is table):
            out.update(linear_tensors(self.lm_head, "lm_head"))
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.attn_norm"] = layer.attn_norm
            out[f"layers.{i}.ffn_norm"] = layer.ffn_norm
            if layer.q_norm is not None and layer.k_norm is not None:
                out[f"layers.{i}.q_norm"], out[f"layers.{i}.k_norm"] = layer.q_norm, layer.k_norm
            for name in self._LAYER_LINEARS:
                out.update(linear_tensors(getattr(layer, name), f"layers.{i}.{name}"))
        if self.kernel_shaped():
            out["head.lanes"] = self.head_lanes()
        return out

    @classmethod
    def from_state(cls, cfg: ModelConfig, t: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> "LlamaModel":
        table = linear_from_tensors(t, "embed", dtype)
        if isinstance(table, FloatLinear):
            embed, tied_head = Embedding(table.weight), table
        else:
            embed, tied_head = Embedding(table), table
        lm_head = linear_from_tensors(t, "lm_head", dtype) if any(k.startswith("lm_head.") for k in t) else tied_head
        layers = [
            Layer(
                attn_norm=t[f"layers.{i}.attn_norm"],
                qkv=linear_from_tensors(t, f"layers.{i}.qkv", dtype),
                o=linear_from_tensors(t, f"layers.{i}.o", dtype),
                ffn_norm=t[f"layers.{i}.ffn_norm"],
                gate_up=linear_from_tensors(t, f"layers.{i}.gate_up", dtype),
                down=linear_from_tensors(t, f"layers.{i}.down", dtype),
                q_norm=t.get(f"layers.{i}.q_norm"), k_norm=t.get(f"layers.{i}.k_norm"),
            )
            for i in range(cfg.n_layers)
        ]
        model = cls(cfg, embed, layers, t["norm"], lm_head, dtype, device)
        model._head_lanes = t.get("head.lanes")
        return model
