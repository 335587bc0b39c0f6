"""GGUF tensor data as torch tensors: memory-mapped reads, fast dequantisation, int4 repacking.

Metadata comes from `formats/gguf.py` (a pure-Python header reader that skips the big tokenizer
arrays: `gguf.GGUFReader` takes ~2 s on a 100 MB file, this takes ~30 ms). Tensor bytes are read
through one `numpy.memmap`, so nothing is copied until a tensor is converted.

Q4_0 / Q4_1 / Q8_0 are decoded with torch ops (vectorised, ~100x faster than the gguf package's
numpy reference); every other type goes through `gguf.quants.dequantize`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from influence_tui.formats.gguf import GGUFError, GGUFHeader, GGUFTensorInfo, read_gguf_header

# ggml type ids (ggml.h) for the types decoded here with torch
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
QK = 32  # block size of Q4_0/Q4_1/Q8_0


@dataclass
class Q4Blocks:
    """A Q4_0/Q4_1 matrix split into its parts: w[n, k] = q[n, k] * scale[n, k//32] + minimum[n, k//32]."""

    q: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K/32]
    minimum: torch.Tensor  # float32 [N, K/32]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.view(n, k // QK, QK).float() * self.scale[..., None] + self.minimum[..., None]
        return w.view(n, k)


def _as_torch(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # the memmap is read-only; we never write through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of each block, as float32 [...]."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16)[..., 0].float()


class GGUFTensors:
    """Random access to the tensors of one GGUF file."""

    def __init__(self, path: str | Path, header: GGUFHeader | None = None) -> None:
        self.path = Path(path)
        try:
            self.header = header or read_gguf_header(self.path, skip_arrays=True)
            self.header.check_complete()
        except GGUFError as exc:
            raise ValueError(str(exc)) from exc
        self.infos: dict[str, GGUFTensorInfo] = {t.name: t for t in self.header.tensors}
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def type_name(self, name: str) -> str:
        return self.infos[name].type_name

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order (rows first), e.g. (out_features, in_features)."""
        return tuple(reversed(self.infos[name].shape))

    def raw(self, name: str) -> np.ndarray:
        info = self.infos[name]
        start = self.header.data_offset + info.offset
        return self._mm[start : start + info.nbytes]

    def _blocks(self, name: str, block_bytes: int) -> torch.Tensor:
        rows_shape = self.shape(name)
        k = rows_shape[-1]
        n = int(np.prod(rows_shape[:-1])) if len(rows_shape) > 1 else 1
        return _as_torch(self.raw(name)).view(n, k // QK, block_bytes)

    def q4_blocks(self, name: str) -> Q4Blocks | None:
        """The Q4_0/Q4_1 parts of a 2-D tensor without dequantising, or None for other types."""
        info = self.infos[name]
        if info.type_id not in (Q4_0, Q4_1) or len(info.shape) != 2:
            return None
        q1 = info.type_id == Q4_1
        blocks = self._blocks(name, 20 if q1 else 18)
        scale = _f16_field(blocks, 0)
        qs = blocks[..., 4:] if q1 else blocks[..., 2:]
        # low nibbles hold elements 0..15 of a block, high nibbles 16..31
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(blocks.shape[0], -1)
        minimum = _f16_field(blocks, 2) if q1 else -8.0 * scale
        return Q4Blocks(q, scale, minimum)

    def q8_blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Q8_0 parts of a 2-D tensor: int8 [N, K] and float32 scales [N, K/32]; None otherwise."""
        info = self.infos[name]
        if info.type_id != Q8_0 or len(info.shape) != 2:
            return None
        blocks = self._blocks(name, 34)
        scale = _f16_field(blocks, 0)
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(blocks.shape[0], -1)
        return q, scale

    def dequantize(self, name: str) -> torch.Tensor:
        """Any tensor as float32 (a new tensor; the file is never modified)."""
        info = self.infos[name]
        shape = self.shape(name)
        if info.type_id == F32:
            return _as_torch(self.raw(name)).view(torch.float32).reshape(shape).clone()
        if info.type_id == F16:
            return _as_torch(self.raw(name)).view(torch.float16).reshape(shape).float()
        if info.type_id == BF16:
            return _as_torch(self.raw(name)).view(torch.bfloat16).reshape(shape).float()
        q4 = self.q4_blocks(name)
        if q4 is not None:
            return q4.dequantize().reshape(shape)
        q8 = self.q8_blocks(name)
        if q8 is not None:
            q, scale = q8
            n, k = q.shape
            return (q.view(n, k // QK, QK).float() * scale[..., None]).reshape(shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(info.type_id)
        raw = np.asarray(self.raw(name))
        out = dequantize(raw.reshape(-1, raw.shape[0] // max(1, int(np.prod(shape[:-1])))), qtype)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)
