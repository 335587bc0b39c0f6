"""The converted-weights cache: where it lies and how to map it, without torch.

Repacking a GGUF into the int4 kernel's layout takes ~1 s; the packed tensors are written once
(safetensors format, by `loader.save_converted`) and mapped (torch's model) or read into huge pages
(the kernel's model, see `read_huge`) on later loads, keyed by the source files' path, size and
mtime, the weight format, the dtype, torch's version and the layout. Bump the version when the
stored layout changes. The kernel's torch-free model (`native_model`) reads the same files, so this
module must not import torch: torch's version comes from its `version.py`, read as text.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from influence_tui.engine.native import torch_package_dir

WEIGHTS_CACHE_VERSION = 8  # 8: every tensor starts at a multiple of ALIGN in the file
ALIGN = 64  # bytes: torch's int8/int4 CPU kernels crash on a weight at an unaligned address
PAD = "__pad."  # the name prefix of filler entries between tensors (safetensors allows no holes)
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


def _key(sources: list[Path], settings: str, versions: bool) -> str:
    h = hashlib.sha256(f"v{WEIGHTS_CACHE_VERSION}:{settings}".encode())
    for f in sources:
        st = f.stat()
        h.update(f"|{f.resolve()}".encode() + (f":{st.st_size}:{st.st_mtime_ns}".encode() if versions else b""))
    return h.hexdigest()[:32]


def cache_path(sources: list[Path], quant: str, dtype: str, torch_version: str, layout: str) -> Path:
    """The cache file for these sources. dtype: torch's name for it ("torch.bfloat16")."""
    from influence_tui.engine.tokenizer import cache_dir

    return cache_dir() / "weights" / f"{_key(sources, f'{quant}:{dtype}:{torch_version}:{layout}', True)}.safetensors"


def cache_identity(sources: list[Path], quant: str, dtype: str, torch_version: str, layout: str) -> str:
    """What `cache_path` keys on but the files' size and time: equal for an older conversion of the
    same files with the same settings (stored in the file, so that the next one can remove it)."""
    return _key(sources, f"{quant}:{dtype}:{torch_version}:{layout}", False)


def _parse_header(header: bytes, base: int) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """A safetensors header's {name: (dtype, shape, start, end)}, byte offsets into the file (its
    data starting at `base`), and its metadata; `write_aligned`'s fillers left out."""
    entries = json.loads(header)
    meta = entries.pop("__metadata__", {}) or {}
    return ({name: (info["dtype"], list(info["shape"]), base + info["data_offsets"][0], base + info["data_offsets"][1])
             for name, info in entries.items() if not name.startswith(PAD)}, meta)


def write_aligned(path: Path, tensors: dict[str, tuple[str, list[int], np.ndarray]], metadata: dict[str, str]) -> None:
    """A safetensors file (`name: (dtype, shape, bytes as uint8)`) in which every tensor starts at a
    multiple of ALIGN bytes: the header is padded with spaces (as the format allows) and the gaps
    between tensors are filler entries (it allows no holes). safetensors' own writer packs tensors
    back to back after a header of any length, so most of them started unaligned; a mapped weight
    must be copied before torch's low-bit kernels may read it."""
    entries: dict[str, object] = {"__metadata__": metadata}
    layout, end = [], 0
    for name, (dtype, shape, data) in tensors.items():
        start = -(-end // ALIGN) * ALIGN
        if start > end:
            entries[f"{PAD}{len(layout)}"] = {"dtype": "U8", "shape": [start - end], "data_offsets": [end, start]}
            layout.append(np.zeros(start - end, dtype=np.uint8))
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + data.nbytes]}
        layout.append(data)
        end = start + data.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for data in layout:
            f.write(memoryview(np.ascontiguousarray(data)).cast("B"))


def read_header(path: Path) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """A safetensors file's tensors and metadata (see `_parse_header`); ValueError if it has no
    such header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 26:
            raise ValueError(f"{path}: not a safetensors header")
        return _parse_header(f.read(n), 8 + n)


def read_mmap(path: Path) -> tuple[np.memmap, dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """(the whole file mapped read-only, {name: (dtype, shape, start, end)} with byte offsets into
    it, the metadata). Zero-copy: safetensors' own reader copies into RAM."""
    entries, meta = read_header(path)
    return np.memmap(path, dtype=np.uint8, mode="r"), entries, meta


def prune(folder: Path, keep: Path, identity: str) -> None:
    """Delete the converted-weights files in `folder` that will never be read again: those another
    WEIGHTS_CACHE_VERSION wrote (the version is part of every key) and older conversions of the
    files `keep` was made from (`identity`: the model was downloaded again, or the package that
    carries it reinstalled, and its time changed). Without this, each such change left one more
    copy of the model behind (~100 MB for the bundled one). A process still using one keeps its
    mapping."""
    for f in folder.glob("*.safetensors"):
        if f == keep or not re.fullmatch(r"[0-9a-f]{32}\.safetensors", f.name):
            continue  # only the files cache_path names
        try:
            _, meta = read_header(f)
            if "version" not in meta or "info" not in meta:
                continue  # not written by save_converted
            if meta["version"] != str(WEIGHTS_CACHE_VERSION) or (identity and meta.get("identity") == identity):
                f.unlink()
        except (OSError, ValueError, AttributeError):
            continue


HUGE_PAGE = 2 << 20


def _huge_pages_offered() -> bool:
    """Transparent huge pages on request (Linux's "madvise" or "always" mode)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _memory_available() -> int | None:
    """Bytes the kernel could give without swapping (MemAvailable), where it says."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_huge(path: Path, skip: Iterable[tuple[int, int]] = ()) -> tuple[np.ndarray, Callable[[], None]] | None:
    """The file's bytes in private memory backed by 2 MiB pages, or None where the kernel offers
    none; the byte ranges in `skip` are not read (left zero, and costing no memory). The bytes
    arrive from a thread while the caller goes on (the model is usable, and the first kernel call
    waits, as a mapping's first touches would read the file then): the second value waits for
    them and raises OSError if the read failed.
    Why: a decode step streams every weight once; with the file's 4 KiB pages that is one TLB
    miss per 4 KiB (~23,000 a step for the bundled model, beyond what the TLB holds) and the
    prefetches stop at each page's end. In 2 MiB pages, 8 sequences' steps ran ~11% faster and
    prompts ~4% (one stream: the same). The price: a read (30-190 ms for 95 MB from the page cache
    on this project's shared machine: new memory is slow to fault in there) and no sharing of the
    pages between processes; where memory is short (less available than twice the file), the
    file stays mapped."""
    if not _huge_pages_offered():
        return None
    n = path.stat().st_size
    available = _memory_available()
    if available is not None and available < 2 * n:  # private copies cannot be dropped as the page cache can
        return None
    buf = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(buf, dtype=np.uint8)
    start = (-whole.ctypes.data) % HUGE_PAGE  # the mapping's first 2 MiB boundary: every page huge
    data = whole[start : start + n]
    pos, pieces = 0, []
    for a, b in sorted(skip):
        pieces.append((pos, a))
        pos = max(pos, b)
    pieces.append((pos, n))
    failed: list[OSError] = []

    def fill() -> None:  # readinto lets go of the GIL: this overlaps the caller's Python
        view = memoryview(data)
        try:
            with open(path, "rb", buffering=0) as f:
                for a, b in pieces:
                    f.seek(a)
                    while a < b:
                        got = f.readinto(view[a:b])
                        if not got:
                            raise OSError(f"{path}: shorter than its size")
                        a += got
        except OSError as exc:
            failed.append(exc)

    reader = threading.Thread(target=fill, name="influence-weights", daemon=True)
    reader.start()

    def finish() -> None:
        reader.join()
        if failed:
            raise failed[0]

    return data, finish


def numpy_tensors(path: Path, mapped: Callable[[str], bool] = lambda name: False, huge_pages: bool = True
                  ) -> tuple[dict[str, np.ndarray], dict[str, str], Callable[[], None]]:
    """Every tensor of a cache file as a read-only numpy view, of its bytes read into huge pages
    (see `read_huge`) or, for those `mapped` says (rows looked up now and then), where huge pages
    are not offered or with `huge_pages=False` (a look before deciding), of the file's mapping;
    the metadata; and what to call before reading the tensors in huge pages (it waits for their
    bytes; raises OSError if the read failed)."""
    entries, meta = read_header(path)
    mm = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
    skip = [(a, b) for name, (_, _, a, b) in entries.items() if mapped(name)]
    huge = read_huge(path, skip) if huge_pages else None
    data, finish = huge if huge is not None else (None, lambda: None)
    out = {name: (mm if data is None or mapped(name) else data)[a:b].view(NP_DTYPES[dt]).reshape(shape)
           for name, (dt, shape, a, b) in entries.items()}
    for view in out.values():
        view.flags.writeable = False  # the reader thread writes through its own buffer
    return out, meta, finish


ORPHAN_AGE_S = 3600.0  # untouched this long, a temporary file is not being written


def remove_orphans(folder: Path, patterns: tuple[str, ...]) -> None:
    """Temporary files named NAME.PID.EXT left by a process killed or interrupted while it wrote
    them (Ctrl-C exits without the interpreter's cleanup): its PID is gone and the file has not
    changed for an hour (a PID seen from another container or host says nothing; an hour of
    silence does). Best effort: a file we may not remove is left."""
    now = time.time()
    for pattern in patterns:
        for path in folder.glob(pattern):
            pid = path.name.split(".")[-2]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            try:
                if now - path.stat().st_mtime > ORPHAN_AGE_S:
                    path.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
