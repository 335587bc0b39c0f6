"""The C decode kernel (kernels/decode.c): compiled on first use, loaded with ctypes.

The shared library is built with the machine's C compiler (`$CC`, else cc/gcc) for this CPU
(-march=native) into the user cache dir, keyed by the source, the flags and the compiler, so a
change to any of them rebuilds it. It links no torch headers: tensors are passed as pointers.

It is used only where it is fast: the AVX-512 BF16 build (`vectorized()`). Elsewhere, without a
compiler, or with INFLUENCE_NATIVE=0, the engine keeps torch's own int4 kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path

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
    lib.influence_vectorized.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL:
    """The built kernel library; NativeUnavailable with the reason when it cannot be had."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("INFLUENCE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _error = "disabled by INFLUENCE_NATIVE=0"
            else:
                import torch  # noqa: F401  (its OpenMP runtime is loaded first and then shared)

                try:
                    _lib = open_library(build())
                except (NativeUnavailable, OSError, subprocess.SubprocessError) as exc:
                    _error = str(exc)
        if _lib is None:
            raise NativeUnavailable(_error or "unavailable")
        return _lib


def vectorized() -> bool:
    """True when the fast (AVX-512 BF16) kernel is built and loaded on this machine."""
    try:
        return bool(library().influence_vectorized())
    except NativeUnavailable:
        return False


# -- the structs of decode.c -------------------------------------------------------------------
class Q4Mat(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class LayerT(ctypes.Structure):
    _fields_ = [("qkv", Q4Mat), ("o", Q4Mat), ("gate_up", Q4Mat), ("down", Q4Mat),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("kv", ctypes.c_void_p)]


class ModelT(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "dim", "n_heads", "n_kv", "head_dim", "ffn", "vocab", "max_seq", "max_batch")] + [
        ("norm_eps", ctypes.c_float), ("layers", ctypes.c_void_p),
        ("emb_q", ctypes.c_void_p), ("emb_scale", ctypes.c_void_p),
        ("head_q", ctypes.c_void_p), ("head_scale", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p)]


if __name__ == "__main__":  # `python -m influence_tui.engine.native`: build now (setup.sh does)
    try:
        lib = library()
        print(f"native decode kernel ready ({'AVX-512 BF16' if lib.influence_vectorized() else 'portable, unused'})")
    except NativeUnavailable as exc:
        print(f"native decode kernel unavailable: {exc}; torch's kernels are used")
