"""The Llama model on the decode kernel alone, with torch never imported.

Where the C kernel (kernels/decode.c) runs the whole model (a CPU with AVX-512 BF16 + VNNI and no
matrix units, int4 weights in its layout, an int8 embedding and lm_head), `model.LlamaModel` is
only a holder of pointers: every prompt row and decode step is one kernel call. `KernelLlama` is
that holder without torch: the weights are numpy views of the converted-weights cache (read into 2
MiB pages where Linux offers them, else mapped as `loader.load_converted` maps them), the KV cache
an anonymous mapping, the rotary and norm tables computed as `LlamaModel` computes them. The same
kernel calls on the same bytes give the same logits, bit for bit (tested). What it saves is torch
itself: ~1.3 s of import and ~220 MB of memory (a 135M model then runs in less memory than
llama.cpp's).

`load_native` returns None wherever this does not apply, and the engine loads the torch model:
a GPU (or a torch build that could use one), no kernel, a CPU with AMX (torch's bf16 matmuls
outrun the kernel's rows on prompts there), weights not converted yet (the first load of a GGUF
converts them with torch and writes the cache), or anything the kernel does not take.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from influence_tui.engine import native, rope, weights_cache
from influence_tui.engine.base import LoadedModel, ModelConfig
from influence_tui.engine.governor import ThreadGovernor, capped_threads
from influence_tui.engine.native import IntRows, LayerT, NativeStep, NativeUnavailable, Q4Mat
from influence_tui.engine.sources import Located, allocate_and_tokenizer, locate, safetensors_files

def physical_cores() -> int:
    """CPUs this process may run on, counting SMT siblings once (torch's default thread count)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            base = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            cores.add(("", str(c)))
    return max(1, len(cores))


def _bf16_to_f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


class KernelLlama:
    """Implements `engine.base.CausalLM` with numpy logits; prompts run as kernel rows."""

    rows_only = True  # prompts are kernel rows: every cached position is what a decode step computes
    rows_exact = True
    native = True

    def __init__(self, cfg: ModelConfig, t: dict[str, np.ndarray], lib: Any, keep: Any,
                 weights_read: Callable[[], None] | None = None) -> None:
        """`weights_read`: waits until the weights' bytes are in memory (they arrive from a thread,
        see `weights_cache.read_huge`); the first kernel call calls it. Only the norms are read
        here."""
        self.cfg, self._lib, self._keep = cfg, lib, keep
        self._weights_read = weights_read
        self.vocab_size, self.context_length = cfg.vocab_size, cfg.context_length
        self.max_batch = self.max_seq = 0
        self.threads = physical_cores()
        root = np.float32(math.sqrt(cfg.dim))  # the norms pre-multiplied by sqrt(dim), as LlamaModel's
        self._norms = [(_bf16_to_f32(t[f"layers.{i}.attn_norm"]) * root, _bf16_to_f32(t[f"layers.{i}.ffn_norm"]) * root)
                       for i in range(cfg.n_layers)]
        self._final_norm = _bf16_to_f32(t["norm"]) * root
        self._norm_eps = float(np.float32(math.sqrt(cfg.dim * cfg.norm_eps)))
        head = "lm_head" if "lm_head.q8" in t else "embed"  # tied: the embedding's rows
        self._tables = {"emb_q": t["embed.q8"].ctypes.data, "emb_scale": t["embed.scale"].ctypes.data,
                        "head_lanes": t["head.lanes"].ctypes.data, "head_scale": t[f"{head}.scale"].ctypes.data}
        self._layers = [[self._q4(t, f"layers.{i}.{name}") for name in ("qkv", "o", "gate_up", "down")]
                        for i in range(cfg.n_layers)]
        # Qwen3's per-head norms (float32), or null pointers
        self._head_norms = [[t[k].ctypes.data if k in t else None for k in (f"layers.{i}.q_norm", f"layers.{i}.k_norm")]
                            for i in range(cfg.n_layers)]
        self._governors: dict[int, ThreadGovernor] = {}
        self.kv_cache: list[np.ndarray] = []
        self._buffers: list[mmap.mmap] = []
        self._step: NativeStep | None = None

    @staticmethod
    def _q4(t: dict[str, np.ndarray], prefix: str) -> Q4Mat:
        """The kernel's view of one matrix (pointers into `t`, which the model keeps)."""
        qs, d, m = t[f"{prefix}.q4s"], t[f"{prefix}.q4d"], t[f"{prefix}.q4m"]
        bias = t.get(f"{prefix}.bias")
        return Q4Mat(qs.ctypes.data, d.ctypes.data, m.ctypes.data, None if bias is None else bias.ctypes.data,
                     qs.shape[0], qs.shape[1] * 2)

    @classmethod
    def usable(cls, t: dict[str, np.ndarray], cfg: ModelConfig) -> bool:
        """The cache holds what the kernel takes: Q4 layers (bf16 biases), an int8 embedding and a
        bias-free int8 head, in shapes it handles."""
        for i in range(cfg.n_layers):
            for name in ("qkv", "o", "gate_up", "down"):
                p = f"layers.{i}.{name}"
                if f"{p}.q4s" not in t or (f"{p}.bias" in t and t[f"{p}.bias"].dtype != np.uint16):
                    return False
        head_ok = "lm_head.q8" in t or not any(k.startswith("lm_head.") for k in t)
        return ("embed.q8" in t and "head.lanes" in t and head_ok and "lm_head.bias" not in t and NativeStep.fits(cfg)
                and all(f"layers.{i}.{n}" in t for i in range(cfg.n_layers)
                        for n in ("attn_norm", "ffn_norm", *(("q_norm", "k_norm") if cfg.qk_norm else ()))))

    # -- cache ------------------------------------------------------------------------------
    def allocate(self, max_batch: int, max_seq: int) -> None:
        cfg = self.cfg
        max_seq = min(max_seq, self.context_length)
        shape = (max_batch, 2, cfg.n_kv_heads, max_seq, cfg.head_dim)
        nbytes = math.prod(shape) * 2
        # anonymous mappings: zero pages cost nothing until a slot writes them (see LlamaModel._zeros)
        self._buffers = [mmap.mmap(-1, max(nbytes, 1)) for _ in range(cfg.n_layers)]
        self.kv_cache = [np.frombuffer(b, dtype=np.uint16, count=math.prod(shape)).reshape(shape) for b in self._buffers]
        self.max_batch, self.max_seq = max_batch, max_seq
        self._rope_cos, self._rope_sin = rope.kernel_tables(cfg, max_seq)
        layers = [LayerT(*mats, attn.ctypes.data, ffn.ctypes.data, kv.ctypes.data, *heads)
                  for mats, (attn, ffn), kv, heads in zip(self._layers, self._norms, self.kv_cache, self._head_norms)]
        ptrs = {**self._tables, "final_norm": self._final_norm.ctypes.data, "rope_cos": self._rope_cos.ctypes.data,
                "rope_sin": self._rope_sin.ctypes.data}
        self._step = NativeStep(self._lib, cfg, max_batch, max_seq, self._norm_eps, layers, ptrs, [self._keep])

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        """Copy the K/V of positions [0, n) from slot `src` to slot `dst`, bit for bit."""
        if not (0 <= src < self.max_batch and 0 <= dst < self.max_batch and 0 <= n <= self.max_seq):
            raise ValueError(f"cannot copy {n} positions from slot {src} to slot {dst}")
        for kv in self.kv_cache:
            kv[dst, :, :, :n] = kv[src, :, :, :n]


    def set_threads(self, n: int | None) -> None:
        """Kernel threads (None: one per physical core, as torch's default)."""
        self.threads = capped_threads(n) or physical_cores()

    # -- steps --------------------------------------------------------------------------------
    def _kernel(self) -> NativeStep:
        if self._step is None:
            raise RuntimeError("allocate() the KV cache before running the model")
        if self._weights_read is not None:  # the first call: the weights may still be arriving
            try:
                self._weights_read()
            except OSError as exc:
                raise RuntimeError(f"the converted weights could not be read: {exc}") from exc
            self._weights_read = None
        return self._step

    def decode(self, slots: IntRows, tokens: IntRows, positions: IntRows) -> np.ndarray:
        """One decode step (token b at position b of slot b): float32 logits [B, vocab]."""
        step = self._kernel()
        gov = self._governors.setdefault(len(tokens), ThreadGovernor())
        n, t0 = gov.threads(self.threads), time.perf_counter()
        try:
            return step.decode(slots, tokens, positions, n)
        finally:
            gov.record(time.perf_counter() - t0)

    def step_rows(self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int]) -> np.ndarray:
        """Rows of any slots at any positions in one call (see LlamaModel.step_rows)."""
        return self._kernel().decode(slots, tokens, positions, self.threads, logit_rows)

    def _rows(self, jobs: list[tuple[int, IntRows, int]]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Prompts as kernel rows: (slots, tokens, positions, each prompt's last row)."""
        slots: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for slot, toks, start in jobs:
            toks = [int(x) for x in toks]
            t = len(toks)
            if t < 1 or start < 0 or start + t > self.max_seq or not 0 <= slot < self.max_batch:
                raise ValueError(f"positions {start}..{start + t - 1} of slot {slot} do not fit the cache")
            slots += [slot] * t
            tokens += toks
            positions += range(start, start + t)
            last.append(len(tokens) - 1)
        return slots, tokens, positions, last

    def prefill_many(self, jobs: list[tuple[int, IntRows, int]], chunk: int = 0) -> list[np.ndarray]:
        """Several (slot, tokens, start) prompts as rows of one kernel call; each one's last logits."""
        if not jobs:
            return []
        slots, tokens, positions, last = self._rows(jobs)
        return list(self._kernel().decode(slots, tokens, positions, self.threads, last))

    def prefill(self, slot: int, tokens: IntRows, start_pos: int, all_logits: bool = False) -> np.ndarray:
        slots, toks, positions, last = self._rows([(slot, tokens, start_pos)])
        rows = self._kernel().decode(slots, toks, positions, self.threads, None if all_logits else last)
        return rows if all_logits else rows[0]

    def prefill_chunked(self, slot: int, tokens: IntRows, start_pos: int, chunk: int) -> np.ndarray:
        """As LlamaModel.prefill_chunked (the benchmark's prompt path); chunks do not apply to rows."""
        return self.prefill(slot, tokens, start_pos)


def _torch_may_use_a_gpu() -> bool:
    """Whether `device="auto"` could resolve to a GPU, judged without importing torch: a torch
    build for CUDA/ROCm/XPU with its driver present, or Apple silicon (MPS)."""
    build = weights_cache.torch_build()
    if sys.platform == "darwin":
        return True
    if build.get("cuda") and (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")):
        return True
    if build.get("hip") and os.path.exists("/dev/kfd"):
        return True
    return bool(build.get("xpu")) and os.path.exists("/dev/dri")


def _mapped(name: str) -> bool:
    """Tensors left in the file's mapping rather than read into huge pages: the row-major int8
    tables (embedding rows are read a few at a time; the kernel reads the lm_head from its lanes)
    and the norms, read as the model is built, before the rest has arrived."""
    return name in ("norm", "embed.q8", "lm_head.q8") or name.endswith(("attn_norm", "ffn_norm"))


def load_native(path: str, device: str = "auto", max_batch: int = 8, max_seq: int | None = None,
                dtype: str | None = None, quant: str | None = None) -> LoadedModel | None:
    """The model at `path` as a `KernelLlama` (see the module's docstring), or None for the torch
    loader. Raises ModelLoadError for paths that no loader could use."""
    t0 = time.perf_counter()
    device, q = (device or "auto").lower(), (quant or "auto").lower()
    if device not in ("auto", "cpu") or (dtype or "auto").lower() not in ("auto", "bfloat16", "bf16") or q not in ("auto", "int4"):
        return None
    if native.disabled() or (device == "auto" and _torch_may_use_a_gpu()):
        return None
    loc = locate(path)
    build = weights_cache.torch_build()
    if "__version__" not in build:
        return None
    try:
        if not native.vectorized() or native.has_matrix_units():
            return None
        lib = native.library()
    except NativeUnavailable:
        return None
    sources = [loc.file] if loc.file is not None else safetensors_files(loc.folder)  # type: ignore[arg-type]
    cached = weights_cache.cache_path(sources, q, "torch.bfloat16", str(build["__version__"]), "q4native")
    if not cached.exists():
        return None
    try:  # a look at the mapped file first: the weights are read into memory only for a model the kernel takes
        tensors, meta, _ = weights_cache.numpy_tensors(cached, huge_pages=False)
        if meta.get("version") != str(weights_cache.WEIGHTS_CACHE_VERSION):
            return None
        cfg = ModelConfig(**json.loads(meta["config"]))
        info = json.loads(meta["info"])
        if not KernelLlama.usable(tensors, cfg) or info.get("weights") != "int4":
            return None
        tensors, meta, weights_read = weights_cache.numpy_tensors(cached, mapped=_mapped)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the torch loader rebuilds a damaged entry
    model = KernelLlama(cfg, tensors, lib, tensors, weights_read)
    return _loaded(model, loc, info, max_batch, max_seq, t0)


def _loaded(model: KernelLlama, loc: Located, info: dict, max_batch: int, max_seq: int | None, t0: float) -> LoadedModel:
    tokenizer = allocate_and_tokenizer(model, loc, info, max_batch, max_seq)
    cfg, ctx = model.cfg, model.context_length
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=info["name"], path=str(loc.file or loc.folder),
        architecture=cfg.architecture, format=loc.format, quantization=info["quantization"], dtype="bfloat16",
        device="cpu", context_length=ctx, parameters=info["parameters"], load_s=time.perf_counter() - t0,
        extra={"weights": info["weights"], "max_batch": max_batch, "max_seq": model.max_seq, "config": cfg,
               "cached": True, "torch": False},
    )


if __name__ == "__main__":  # `python -m influence_tui.engine.native_model` (setup.sh): the bundled model ready now
    from influence_tui.library import bundled_gguf_path

    bundled = bundled_gguf_path()
    if bundled is None:
        sys.exit("the bundled model is not installed")
    if load_native(str(bundled), max_batch=1, max_seq=64) is None:
        from influence_tui.engine.loader import load_model

        load_model(str(bundled), max_batch=1, max_seq=64)  # converts the GGUF and writes the weights cache
    ready = load_native(str(bundled), max_batch=1, max_seq=64) is not None
    print("bundled model ready: " + ("loads without torch (C kernel)" if ready else "torch's model (no AVX-512 kernel here)"))
