"""The C decode kernel (kernels/decode.c): compiled on first use, loaded with ctypes.

The shared library is built with the machine's C compiler (`$CC`, else cc/gcc) for this CPU
(-march=native) into the user cache dir, keyed by the source, the flags and the compiler, so a
change to any of them rebuilds it. It links no torch headers: tensors are passed as pointers.

It is used only where it is fast: the AVX-512 BF16 + VNNI build (`vectorized()`). Elsewhere, without a
compiler, or with INFLUENCE_NATIVE=0, the engine keeps torch's own int4 kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from influence_tui.engine.base import ModelConfig
    from influence_tui.engine.model import LlamaModel

SOURCE = "decode.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class NativeUnavailable(RuntimeError):
    pass


def _source() -> bytes:
    return resources.files("influence_tui.engine.kernels").joinpath(SOURCE).read_bytes()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: a library built on another CPU (a shared home folder)
    could use instructions this one lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build(flags: list[str] | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernel (if not already built) and return the library's path."""
    from influence_tui.engine.tokenizer import cache_dir

    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (set CC)")
    flags = FLAGS if flags is None else flags
    src = _source()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((flags, version, os.uname().machine, _cpu_id())).encode()).hexdigest()[:24]
    folder = out_dir or cache_dir() / "kernels"
    lib = folder / f"decode-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    from influence_tui.engine.weights_cache import remove_orphans  # (it imports this module)

    # a build interrupted mid-compile leaves these (its cleanup runs on a daemon thread)
    remove_orphans(folder, ("decode-*.*.c", "decode-*.*.tmp"))
    c_file = folder / f"decode-{key}.{os.getpid()}.c"
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    try:
        c_file.write_bytes(src)
        done = subprocess.run([cc, *flags, "-o", str(tmp), str(c_file), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailable(f"{cc} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        tmp.replace(lib)  # atomic: a concurrent process sees the whole library or none
    finally:
        c_file.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return lib


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.influence_decode.restype = ctypes.c_int
    lib.influence_decode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.influence_q4_matmul.restype = ctypes.c_int
    lib.influence_q4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.influence_q4_dequant.restype = None
    lib.influence_q4_dequant.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.influence_prefill_attention.restype = ctypes.c_int
    lib.influence_prefill_attention.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.influence_sample.restype = ctypes.c_int64
    lib.influence_sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_double,
                                     ctypes.c_void_p, ctypes.c_void_p]
    lib.influence_vectorized.restype = ctypes.c_int
    return lib


def disabled() -> bool:
    """INFLUENCE_NATIVE=0 (or false/no/off): torch's kernels, not this one."""
    return os.environ.get("INFLUENCE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def library() -> ctypes.CDLL:
    """The built kernel library; NativeUnavailable with the reason when it cannot be had."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            if disabled():
                _error = "disabled by INFLUENCE_NATIVE=0"
            else:
                _share_openmp_runtime()
                try:
                    _lib = open_library(build())
                except (NativeUnavailable, OSError, subprocess.SubprocessError) as exc:
                    _error = str(exc)
        if _lib is None:
            raise NativeUnavailable(_error or "unavailable")
        return _lib


def torch_package_dir() -> Path | None:
    """Where torch is installed, found without importing it (~1.3 s, ~220 MB); None without torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _share_openmp_runtime() -> None:
    """Load torch's OpenMP runtime (its libgomp.so.1) before the kernel, without importing torch:
    the kernel binds to it by its soname, and so does torch if it comes later (embeddings, a
    GPU model), so one pool of threads serves both. Importing torch for this cost ~1.3 s and
    ~220 MB; the kernel's own model does not need torch at all."""
    folder = torch_package_dir()
    if "torch" in sys.modules or folder is None:
        return
    gomp = folder / "lib" / "libgomp.so.1"
    if gomp.exists():
        try:
            ctypes.CDLL(str(gomp), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # the system's libgomp then serves the kernel


def has_matrix_units() -> bool:
    """Intel AMX tiles: there torch's dense bf16 matmuls (oneDNN) outrun the kernel's rows on prompts."""
    return "amx_bf16" in _cpu_id().split()


def vectorized() -> bool:
    """True when the fast (AVX-512 BF16 + VNNI) kernel is built and loaded on this machine."""
    try:
        return bool(library().influence_vectorized())
    except NativeUnavailable:
        return False


def head_lanes(q: np.ndarray) -> np.ndarray:
    """An int8 matrix [n, k] (k a multiple of 64) as the kernel's lm_head reads it (see head_rows in
    decode.c): uint8 [ceil(n / 16) * 16 * k], blocks of 16 rows (the last padded with zeros), in
    each the 16 lane classes, in each k/64 vectors whose lane l holds 4 elements of row l, + 128."""
    n, k = q.shape
    blocks = -(-n // 16)
    padded = np.zeros((blocks * 16, k), dtype=np.int8)
    padded[:n] = q
    lanes = (padded.view(np.uint8) ^ 0x80).reshape(blocks, 16, k // 64, 16, 4).transpose(0, 3, 2, 1, 4)
    return np.ascontiguousarray(lanes).reshape(-1)


# -- the structs of decode.c -------------------------------------------------------------------
class Q4Mat(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class LayerT(ctypes.Structure):
    _fields_ = [("qkv", Q4Mat), ("o", Q4Mat), ("gate_up", Q4Mat), ("down", Q4Mat),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("kv", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]


class ModelT(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "dim", "n_heads", "n_kv", "head_dim", "ffn", "vocab", "max_seq", "max_batch")] + [
        ("norm_eps", ctypes.c_float), ("layers", ctypes.c_void_p),
        ("emb_q", ctypes.c_void_p), ("emb_scale", ctypes.c_void_p),
        ("head_lanes", ctypes.c_void_p), ("head_scale", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
        ("head_eps", ctypes.c_float)]


class _Scratch(threading.local):
    buf: Any = None


_scratch = _Scratch()


def sample(logits: Any, overrides: dict[int, float], temperature: float, top_k: int, top_p: float, min_p: float,
           u: float, lib: ctypes.CDLL | None = None) -> int | None:
    """The kernel library's sampler on one row of float32 logits (a contiguous numpy array; not
    modified): `overrides` replace some logits (penalties). The token; None when nothing can be
    drawn (the caller picks greedily) or the library is unavailable."""
    if lib is None:
        try:
            lib = library()
        except NativeUnavailable:
            return None
    n = int(logits.shape[0])
    if _scratch.buf is None or _scratch.buf.size < 5 * n:  # n floats, then 16n bytes for the kernel
        _scratch.buf = np.empty(5 * n, dtype=np.float32)
    ids = (ctypes.c_int64 * len(overrides))(*overrides.keys())
    vals = (ctypes.c_float * len(overrides))(*overrides.values())
    scratch = _scratch.buf.ctypes.data
    token = lib.influence_sample(logits.ctypes.data, n, ids, vals, len(overrides), temperature, top_k or 0,
                                 top_p, min_p, u, scratch, scratch + 4 * n)
    return None if token < 0 else int(token)


IntRows = Any  # a list of ints or a 1-D integer tensor


def _int64s(v: IntRows) -> tuple[int, Any]:
    """(the address of v as contiguous int64s, the object that holds them: keep it until the call returns)"""
    if isinstance(v, (list, tuple)):
        arr = (ctypes.c_int64 * len(v))(*v)
        return ctypes.addressof(arr), arr
    import torch  # a tensor: torch is loaded

    t = v.to(dtype=torch.int64).contiguous()
    return t.data_ptr(), t


class NativeStep:
    """The C decode step bound to one model's weights and KV cache, by address (rebuilt when the
    cache is). `keep` holds whatever owns that memory, for as long as the step lives."""

    def __init__(self, lib: ctypes.CDLL, cfg: "ModelConfig", max_batch: int, max_seq: int, norm_eps: float,
                 layers: list[LayerT], ptrs: dict[str, int], keep: list[Any]) -> None:
        self.lib, self.vocab = lib, cfg.vocab_size
        self.max_batch, self.max_seq = max_batch, max_seq
        self._keep = keep
        self._layers = (LayerT * cfg.n_layers)(*layers)
        self._model = ModelT(
            cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
            max_seq, max_batch, norm_eps, ctypes.addressof(self._layers),
            *(ptrs[k] for k in ("emb_q", "emb_scale", "head_lanes", "head_scale", "final_norm", "rope_cos", "rope_sin")),
            cfg.norm_eps,
        )

    @staticmethod
    def fits(cfg: "ModelConfig") -> bool:
        """Shapes the kernel takes (besides its weights' formats)."""
        return not (cfg.head_dim % 2 or cfg.n_heads % cfg.n_kv_heads or cfg.dim % 64)

    @classmethod
    def for_model(cls, model: "LlamaModel") -> "NativeStep | None":
        """The step for this model when every piece fits the kernel: CPU, bf16, Q4Linear layers, an
        int8 embedding and lm_head. None keeps the torch path."""
        import torch

        from influence_tui.engine.quant import Int8Linear

        cfg = model.cfg
        table, head = model.embed.table, model.lm_head
        if (
            model.device.type != "cpu" or model.dtype != torch.bfloat16 or not model.kernel_shaped()
            or not isinstance(table, Int8Linear) or head.bias is not None or not cls.fits(cfg)
        ):
            return None
        try:
            lib = library()
        except NativeUnavailable:
            return None
        norms = model._norm_weights()
        head_norms = [[None if w is None else w.float().contiguous() for w in (layer.q_norm, layer.k_norm)]
                      for layer in model.layers]
        layers = [LayerT(layer.qkv.struct(), layer.o.struct(), layer.gate_up.struct(), layer.down.struct(),
                         attn_norm.data_ptr(), ffn_norm.data_ptr(), model.kv_cache[i].data_ptr(),
                         *(None if w is None else w.data_ptr() for w in head_norms[i]))
                  for i, (layer, (attn_norm, ffn_norm)) in enumerate(zip(model.layers, norms))]
        keep = [table.q.contiguous(), table.scale.contiguous(), model.head_lanes().contiguous(), head.scale.contiguous(),
                head_norms]
        ptrs = dict(zip(("emb_q", "emb_scale", "head_lanes", "head_scale"), (t.data_ptr() for t in keep)))
        ptrs.update(final_norm=model._final_norm.data_ptr(), rope_cos=model._rope_cos.data_ptr(),
                    rope_sin=model._rope_sin.data_ptr())
        return cls(lib, cfg, model.max_batch, model.max_seq, float(model._norm_eps), layers, ptrs, keep)

    def decode(
        self, slots: "IntRows", tokens: "IntRows", positions: "IntRows", threads: int,
        logit_rows: list[int] | None = None,
    ) -> np.ndarray:
        """One kernel call for B tokens (own slot and position each; a slot may repeat at consecutive
        positions: a prompt run as rows). Float32 logits of `logit_rows` (default: every token), as
        numpy. Lists of ints are passed as they are: three small tensors cost a decode step ~70 us."""
        b = len(tokens)
        args = [_int64s(v) for v in (slots, tokens, positions)]
        rows = None if logit_rows is None else _int64s(logit_rows)
        n_logits = b if logit_rows is None else len(logit_rows)
        logits = np.empty((n_logits, self.vocab), dtype=np.float32)
        rc = self.lib.influence_decode(ctypes.byref(self._model), b, args[0][0], args[1][0], args[2][0],
                                       None if rows is None else rows[0], n_logits, logits.ctypes.data, threads)
        if rc == -1:
            raise ValueError(f"a slot, position or token is outside the cache ({self.max_batch} x {self.max_seq}) or vocabulary")
        if rc != 0:
            raise MemoryError("the decode kernel could not allocate its buffers")
        return logits

    def prefill_attention(self, layer: int, slot: int, start: int, q: "torch.Tensor") -> "torch.Tensor | None":
        """Causal attention of prefill rows start.. of a slot whose K/V are cached: q bf16 [T, heads,
        head_dim] -> bf16 [T, heads * head_dim]; None where the kernel does not fit the shapes."""
        import torch

        q = q.contiguous()
        t = int(q.shape[0])
        out = torch.empty(t, q.shape[1] * q.shape[2], dtype=torch.bfloat16)
        rc = self.lib.influence_prefill_attention(ctypes.byref(self._model), layer, slot, start, t, q.data_ptr(),
                                                  out.data_ptr(), torch.get_num_threads())
        return out if rc == 0 else None


if __name__ == "__main__":  # `python -m influence_tui.engine.native`: build now (setup.sh does)
    try:
        lib = library()
        print(f"native decode kernel ready ({'AVX-512 BF16 + VNNI' if lib.influence_vectorized() else 'portable, unused'})")
    except NativeUnavailable as exc:
        print(f"native decode kernel unavailable: {exc}; torch's kernels are used")
