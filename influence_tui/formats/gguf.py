"""GGUF header reader: metadata and tensor descriptors, no tensor data, no torch.

Used by the library (fast listing, quantization read from the tensors' own types) and by the
loader. Truncated or foreign files raise `GGUFError` with a one-line reason.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"

# ggml type id -> (name, block size in elements, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
}

# general.file_type (llama_ftype) -> label, used only when the tensors do not settle it
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}

_U64 = struct.Struct("<Q")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFError(ValueError):
    pass


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] is the fastest-varying (columns)
    type_id: int
    offset: int  # relative to data_offset

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type{self.type_id}", 1, 1))[0]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES.get(self.type_id, ("?", 1, 0))
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int
    file_size: int
    skipped_arrays: dict[str, int] = field(default_factory=dict)  # key -> length, when not read

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int | None:
        value = self.arch_value("context_length")
        return int(value) if value is not None else None

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        """The dominant weight type of the 2-D tensors (what llama.cpp calls the file's quant)."""
        counts: Counter[str] = Counter()
        for t in self.tensors:
            if len(t.shape) >= 2 and not t.name.startswith("token_embd"):
                counts[t.type_name] += t.n_elements
        if not counts:
            counts.update({t.type_name: t.n_elements for t in self.tensors})
        if not counts:
            return FILE_TYPES.get(int(self.metadata.get("general.file_type", -1)), "unknown")
        top = counts.most_common(1)[0][0]
        ftype = FILE_TYPES.get(int(self.metadata.get("general.file_type", -1)), "")
        # K-quant mixes (Q4_K_M…) are named by the file type when it agrees with the tensors
        if ftype.startswith(top.rstrip("K").rstrip("_")) and ftype != top:
            return ftype
        return top

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    def check_complete(self) -> None:
        """Raise GGUFError if the file is shorter than its tensors need (a truncated download)."""
        end = max((t.offset + t.nbytes for t in self.tensors), default=0)
        if self.data_offset + end > self.file_size:
            missing = self.data_offset + end - self.file_size
            raise GGUFError(f"{self.path.name} is truncated: {missing:,} bytes of tensor data missing")


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh = fh
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise GGUFError(f"{self.path.name} is truncated inside its header")
        return data

    def scalar(self, type_id: int) -> Any:
        fmt = _SCALARS[type_id]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        if n > 1 << 30:
            raise GGUFError(f"{self.path.name} has a corrupt header (string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, type_id: int, key: str, skip_arrays: bool, skipped: dict[str, int]) -> Any:
        if type_id in _SCALARS:
            return self.scalar(type_id)
        if type_id == 8:
            return self.string()
        if type_id == 9:
            item_type = self.scalar(4)
            n = self.scalar(10)
            if n > 1 << 28:
                raise GGUFError(f"{self.path.name} has a corrupt header (array of {n} items)")
            if skip_arrays and n > 64:
                self._skip_array(item_type, n)
                skipped[key] = n
                return None
            return [self.value(item_type, key, skip_arrays, skipped) for _ in range(n)]
        raise GGUFError(f"{self.path.name} has an unknown metadata type {type_id} for {key}")

    def _skip_array(self, item_type: int, n: int) -> None:
        if item_type in _SCALARS:
            self.fh.seek(struct.calcsize(_SCALARS[item_type]) * n, 1)
        elif item_type == 8:
            self._skip_strings(n)
        else:
            for _ in range(n):
                self.value(item_type, "", True, {})

    def _skip_strings(self, n: int) -> None:
        """n strings (a u64 length, then the bytes), walked in memory a block at a time: a
        tokenizer's vocabulary and merges are ~100k of them, and a read and a seek per string
        made listing the models take ~60 ms per GGUF file."""
        buf, off = b"", 0
        for _ in range(n):
            if len(buf) - off < 8:
                buf, off = buf[off:] + self.fh.read(1 << 20), 0
                if len(buf) < 8:
                    raise GGUFError(f"{self.path.name} is truncated inside its header")
            (length,) = _U64.unpack_from(buf, off)
            if length > 1 << 30:
                raise GGUFError(f"{self.path.name} has a corrupt header (string of {length} bytes)")
            off += 8 + length
            if off > len(buf):  # a string longer than what is buffered: skip the rest on disk
                self.fh.seek(off - len(buf), 1)
                buf, off = b"", 0
        self.fh.seek(off - len(buf), 1)  # back to just after the array


def read_gguf_header(path: str | Path, skip_arrays: bool = False) -> GGUFHeader:
    """Parse a GGUF file's header. `skip_arrays` skips big arrays (tokenizer vocab) for speed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            r = _Reader(fh, path)
            if fh.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{path.name} is not a GGUF file (bad magic)")
            version = r.scalar(4)
            if version not in (2, 3):
                raise GGUFError(f"{path.name} has unsupported GGUF version {version}")
            n_tensors, n_kv = r.scalar(10), r.scalar(10)
            if n_tensors > 1 << 20 or n_kv > 1 << 20:
                raise GGUFError(f"{path.name} has a corrupt header")
            metadata: dict[str, Any] = {}
            skipped: dict[str, int] = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.scalar(4), key, skip_arrays, skipped)
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.scalar(4)
                if n_dims > 8:
                    raise GGUFError(f"{path.name} has a corrupt tensor entry {name}")
                shape = tuple(r.scalar(10) for _ in range(n_dims))
                tensors.append(GGUFTensorInfo(name, shape, r.scalar(4), r.scalar(10)))
            align = int(metadata.get("general.alignment", 32) or 32)
            pos = fh.tell()
            data_offset = (pos + align - 1) // align * align
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (struct.error, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path.name} has a corrupt header: {exc}") from None
    return GGUFHeader(path, version, metadata, tensors, data_offset, size, skipped)
