"""The converted-weights cache: where it lies and how to map it, without torch.

Repacking a GGUF into the int4 kernel's layout takes ~1 s; the packed tensors are written once
(safetensors format, by `loader.save_converted`) and memory-mapped on later loads, keyed by the
source files' path, size and mtime, the weight format, the dtype, torch's version and the layout.
Bump the version when the stored layout changes. The kernel's torch-free model (`native_model`)
reads the same files, so this module must not import torch: torch's version comes from its
`version.py`, read as text.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from influence_tui.engine.native import torch_package_dir

WEIGHTS_CACHE_VERSION = 6
# safetensors dtypes as numpy sees them (bf16 has no numpy type: its raw 16 bits)
NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I8": np.int8, "U8": np.uint8,
             "I32": np.int32, "I64": np.int64}


def torch_build() -> dict[str, str | None]:
    """torch's `version.py` fields (__version__, cuda, hip, xpu) without importing torch (~1.3 s,
    ~220 MB); empty where torch is not installed."""
    folder = torch_package_dir()
    if folder is None:
        return {}
    try:
        text = (folder / "version.py").read_text()
    except OSError:
        return {}
    out: dict[str, str | None] = {}
    for key in ("__version__", "cuda", "hip", "xpu"):
        m = re.search(rf"^{key}\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
        if m:
            value = m.group(1).strip()
            out[key] = None if value == "None" else value.strip("'\"")
    return out


def cache_path(sources: list[Path], quant: str, dtype: str, torch_version: str, layout: str) -> Path:
    """The cache file for these sources. dtype: torch's name for it ("torch.bfloat16")."""
    from influence_tui.engine.tokenizer import cache_dir

    h = hashlib.sha256(f"v{WEIGHTS_CACHE_VERSION}:{quant}:{dtype}:{torch_version}:{layout}".encode())
    for f in sources:
        st = f.stat()
        h.update(f"|{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_dir() / "weights" / f"{h.hexdigest()[:32]}.safetensors"


def read_mmap(path: Path) -> tuple[np.memmap, dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """(the whole file mapped read-only, {name: (dtype, shape, start, end)} with byte offsets into
    it, the metadata). Zero-copy: safetensors' own reader copies into RAM."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    n = int.from_bytes(mm[:8].tobytes(), "little")
    header = json.loads(mm[8 : 8 + n].tobytes())
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    entries = {name: (info["dtype"], list(info["shape"]), base + info["data_offsets"][0], base + info["data_offsets"][1])
               for name, info in header.items()}
    return mm, entries, meta


def numpy_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a cache file as a read-only numpy view of the mapping; the metadata."""
    mm, entries, meta = read_mmap(path)
    raw = np.asarray(mm)
    out = {name: raw[a:b].view(NP_DTYPES[dt]).reshape(shape) for name, (dt, shape, a, b) in entries.items()}
    return out, meta
