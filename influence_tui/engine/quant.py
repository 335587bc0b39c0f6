"""Weight-only linear layers: float, int8 per-channel and int4 group-wise (CPU kernels of torch).

All layers take 2-D activations [tokens, in_features] and return [tokens, out_features].

int4 uses `_weight_int4pack_mm_for_cpu` (group 32, bf16 activations: with fp32 activations the
kernel is ~25x slower). Its dequantisation rule is w = (q - 8) * scale + zero, q in 0..15, so a
GGUF Q4_1 block (w = q * d + m) maps onto it exactly with scale = d, zero = m + 8 d, and Q4_0
(w = (q - 8) * d) with zero = 0: the file's nibbles are repacked, never re-quantised.

For many tokens at once (prefill) the int4 kernel is ~8x slower than a dense bf16 matmul on AMX,
so `Int4Linear` dequantises its weight on the fly when the batch is large: transient memory of one
matrix, no second copy of the model kept around.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

GROUP = 32
DENSE_MIN_TOKENS = 16  # from this many rows on, dequantise + dense matmul beats the int4 kernel
_PACK_BLOCK_N = 64  # the CPU int4 pack interleaves rows n and n+32 of each block of 64 rows


@contextmanager
def dense_weights(*linears: object) -> Iterator[None]:
    """Within the block, low-bit linears reuse one dequantised copy of their weight for every
    dense (prefill) matmul, instead of dequantising it per call. Same numbers, less work."""
    held = [lin for lin in linears if isinstance(lin, _LowBitLinear)]
    for lin in held:
        lin._hold = True  # the copy is made on the first dense call (short prompts never need it)
    try:
        yield
    finally:
        for lin in held:
            lin._hold, lin._dense = False, None


class FloatLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight


class _LowBitLinear:
    """What Int8Linear and Int4Linear share: the dense weight a prefill matmul uses, kept for
    reuse while inside `dense_weights()` (made on first use: short prompts never need it)."""

    _dense: torch.Tensor | None = None
    _hold = False

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _held_dense(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        w = self.dense_weight()
        if self._hold:
            self._dense = w
        return w


class Int8Linear(_LowBitLinear):
    """Per-output-channel symmetric int8: w = q * scale[n]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.q = q  # int8 [N, K]
        self.scale = scale.to(dtype)  # [N]
        self.bias = bias
        self.dtype = dtype
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        q, scale = quantize_int8(w)
        return cls(q, scale, bias, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_MIN_TOKENS:
            y = F.linear(x, self._held_dense())
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.dtype) * self.scale[:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows (an embedding lookup on the same table)."""
        return self.q[ids].to(self.dtype) * self.scale[ids, None]


class Int4Linear(_LowBitLinear):
    """Group-wise (32) asymmetric int4 in the CPU kernel's packed layout."""

    def __init__(
        self, packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        """packed: the kernel's layout, uint8 [N, K/2]; scales_zeros: [K/32, N, 2] in `dtype`."""
        self.packed = packed
        self.scales_zeros = scales_zeros
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.bias = bias
        self.dtype = dtype

    @classmethod
    def from_parts(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> "Int4Linear":
        """q: integer [N, K] in 0..15; scale, zero: [N, K/32] with w = (q - 8) * scale + zero."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # the kernel wants [K/32, N, 2]
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, scales_zeros, bias, dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int4Linear":
        q, scale, minimum = quantize_int4(w)
        return cls.from_parts(q, scale, minimum + 8 * scale, bias, dtype)

    @staticmethod
    def supports(n: int, k: int) -> bool:
        return k % GROUP == 0 and n % _PACK_BLOCK_N == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_MIN_TOKENS:
            y = torch.mm(x, self._held_dense())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize_t()

    def dequantize_t(self) -> torch.Tensor:
        """The transposed weight [K, N] in `dtype` (for a dense matmul x @ w.T).

        Built in the pack's own order (blocks of 64 rows: rows n and n+32 share a byte), then one
        transposing copy: ~1.7x faster than `dequantize`, whose unpack moves bytes around first.
        The multiply-add rounds once (w = q * scale + (zero - 8 scale))."""
        n, k = self.out_features, self.in_features
        g, j, half = k // GROUP, n // _PACK_BLOCK_N, _PACK_BLOCK_N // 2
        p = self.packed.view(j, g, GROUP, half)
        scale = self.scales_zeros[..., 0]  # [K/32, N]
        offset = self.scales_zeros[..., 1] - 8 * scale
        # [K/32, N] -> [N/64, K/32, 1, 64]: per block, group, (broadcast over the group's 32 k), row
        scale = scale.view(g, j, 1, _PACK_BLOCK_N).transpose(0, 1).contiguous()
        offset = offset.view(g, j, 1, _PACK_BLOCK_N).transpose(0, 1).contiguous()
        q = torch.cat((p & 0x0F, p >> 4), dim=-1).to(self.dtype)  # [N/64, K/32, 32, 64]
        w = torch.addcmul(offset, q, scale)  # [N/64, K/32, 32, 64] = per block, w.T [K, 64]
        return w.view(j, k, _PACK_BLOCK_N).transpose(0, 1).reshape(k, n)

    def unpacked(self) -> torch.Tensor:
        """The 0..15 values as uint8 [N, K], undoing the pack layout (rows n, n+32 share a byte)."""
        n, k = self.out_features, self.in_features
        p = self.packed.view(n // _PACK_BLOCK_N, k, _PACK_BLOCK_N // 2)
        q = torch.cat([p & 0x0F, p >> 4], dim=-1)  # [N/64, K, 64]
        return q.transpose(1, 2).reshape(n, k)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows [len(ids), K] (an embedding lookup on the same table)."""
        k = self.in_features
        p = self.packed.view(-1, k, _PACK_BLOCK_N // 2)  # [N/64, K, 32]
        half = _PACK_BLOCK_N // 2
        byte = p[ids // _PACK_BLOCK_N, :, ids % half]  # [B, K]
        shift = ((ids % _PACK_BLOCK_N) >= half).to(torch.uint8).mul_(4)[:, None]
        q = ((byte >> shift) & 0x0F).to(self.dtype).view(len(ids), k // GROUP, GROUP)
        sz = self.scales_zeros[:, ids].transpose(0, 1)  # [B, K/32, 2]
        scale, zero = sz[..., 0:1], sz[..., 1:2]
        return ((q - 8) * scale + zero).view(len(ids), k)

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        sz = self.scales_zeros  # [K/32, N, 2]
        scale = sz[..., 0].t().unsqueeze(-1)  # [N, K/32, 1]
        zero = (sz[..., 1].t() - 8 * sz[..., 0].t()).unsqueeze(-1)
        q = self.unpacked().view(n, k // GROUP, GROUP).to(self.dtype)
        return (q * scale).add_(zero).view(n, k)


ROW_BLOCK = 16  # Q4Linear rows stored together, one per 32-bit lane of the kernel's vectors


class Q4Linear(_LowBitLinear):
    """Group-wise (32) int4 in the layout of the C decode kernel (kernels/decode.c): blocks of 16
    rows, one row per 32-bit lane, group by group (256 bytes: byte (u, lane, j) holds weight 4u + j
    low and 16 + 4u + j high), and the GGUF Q4_1 fp16 scale d and minimum m per group (w = q * d + m)
    as [block][group][lane], so a Q4_0/Q4_1 file is repacked exactly, bit for bit.

    Prompts of >= DENSE_MIN_TOKENS rows dequantise the weight (in C) and use a dense bf16 matmul;
    shorter ones, and every decode step, run the kernel."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.qs = qs  # uint8 [N, K/2], in the kernel's byte order
        self.d = d  # float16 [N, K/32], in [block][group][lane] order
        self.m = m  # float16 [N, K/32], likewise
        self.bias = None if bias is None else bias.to(torch.bfloat16).contiguous()
        self.dtype = dtype
        self.out_features, self.in_features = qs.shape[0], qs.shape[1] * 2
        self._struct = None

    @staticmethod
    def supports(n: int, k: int) -> bool:
        return k % GROUP == 0 and n % ROW_BLOCK == 0

    @staticmethod
    def _blocked(t: torch.Tensor) -> torch.Tensor:
        """[N, G] -> the same values in [block][group][lane] order (shape kept)."""
        n, g = t.shape
        return t.reshape(n // ROW_BLOCK, ROW_BLOCK, g).permute(0, 2, 1).reshape(n, g).contiguous()

    @staticmethod
    def _unblocked(t: torch.Tensor) -> torch.Tensor:
        n, g = t.shape
        return t.reshape(n // ROW_BLOCK, g, ROW_BLOCK).permute(0, 2, 1).reshape(n, g)

    @classmethod
    def from_parts(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> "Q4Linear":
        """q: integer [N, K] in 0..15; scale, minimum: [N, K/32] with w = q * scale + minimum."""
        n, k = q.shape
        # [block, lane, group, half, u, j]: weight half*16 + 4u + j of a group; halves share a byte
        q = q.to(torch.uint8).reshape(n // ROW_BLOCK, ROW_BLOCK, k // GROUP, 2, 4, 4)
        packed = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [block, lane, group, u, j]
        qs = packed.permute(0, 2, 3, 1, 4).reshape(n, k // 2).contiguous()  # [block, group, u, lane, j]
        return cls(qs, cls._blocked(scale.to(torch.float16)), cls._blocked(minimum.to(torch.float16)), bias, dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Q4Linear":
        q, scale, minimum = quantize_int4(w)
        return cls.from_parts(q, scale, minimum, bias, dtype)

    def struct(self):
        """The kernel's view of this matrix (pointers into the tensors above)."""
        if self._struct is None:
            from influence_tui.engine.native import Q4Mat

            bias = self.bias.data_ptr() if self.bias is not None else None
            self._struct = Q4Mat(self.qs.data_ptr(), self.d.data_ptr(), self.m.data_ptr(), bias,
                                 self.out_features, self.in_features)
        return self._struct

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_MIN_TOKENS:
            y = F.linear(x.to(torch.bfloat16), self._held_dense())
            return y if self.bias is None else y + self.bias
        import ctypes

        from influence_tui.engine.native import library

        x = x.to(torch.bfloat16).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)
        rc = library().influence_q4_matmul(ctypes.byref(self.struct()), x.data_ptr(), x.shape[0], y.data_ptr(),
                                           torch.get_num_threads())
        if rc != 0:
            raise MemoryError("the int4 kernel could not allocate its buffers")
        return y

    def dense_weight(self) -> torch.Tensor:
        """bf16 [N, K] = bf16(q * d + m), dequantised in C (at memory speed)."""
        import ctypes

        from influence_tui.engine.native import library

        out = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16)
        library().influence_q4_dequant(ctypes.byref(self.struct()), out.data_ptr(), torch.get_num_threads())
        return out

    def unpacked(self) -> torch.Tensor:
        """The 0..15 values as uint8 [N, K], undoing the layout."""
        n, k = self.out_features, self.in_features
        packed = self.qs.reshape(n // ROW_BLOCK, k // GROUP, 4, ROW_BLOCK, 4).permute(0, 3, 1, 2, 4)  # [block, lane, group, u, j]
        return torch.stack((packed & 0x0F, packed >> 4), dim=3).reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        q = self.unpacked().view(n, k // GROUP, GROUP).float()
        d, m = self._unblocked(self.d).float(), self._unblocked(self.m).float()
        return (q * d[..., None] + m[..., None]).view(n, k).to(self.dtype)


Linear = FloatLinear | Int8Linear | Int4Linear | Q4Linear


def linear_tensors(layer: Linear, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors that rebuild `layer` with `linear_from_tensors` (for the on-disk cache)."""
    if isinstance(layer, Q4Linear):
        out = {f"{prefix}.q4s": layer.qs, f"{prefix}.q4d": layer.d, f"{prefix}.q4m": layer.m}
    elif isinstance(layer, Int4Linear):
        out = {f"{prefix}.packed": layer.packed, f"{prefix}.scales_zeros": layer.scales_zeros}
    elif isinstance(layer, Int8Linear):
        out = {f"{prefix}.q8": layer.q, f"{prefix}.scale": layer.scale}
    else:
        out = {f"{prefix}.weight": layer.weight}
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias
    return out


def linear_from_tensors(t: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> Linear:
    bias = t.get(f"{prefix}.bias")
    if f"{prefix}.q4s" in t:
        return Q4Linear(t[f"{prefix}.q4s"], t[f"{prefix}.q4d"], t[f"{prefix}.q4m"], bias, dtype)
    if f"{prefix}.packed" in t:
        return Int4Linear(t[f"{prefix}.packed"], t[f"{prefix}.scales_zeros"], bias, dtype)
    if f"{prefix}.q8" in t:
        return Int8Linear(t[f"{prefix}.q8"], t[f"{prefix}.scale"], bias, dtype)
    return FloatLinear(t[f"{prefix}.weight"], bias)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 [N, K], float32 scale [N])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-32 int4 (like GGUF Q4_1): returns (uint8 q [N, K], scale, minimum [N, K/32])."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(n, k), scale, lo


def native_int4(dtype: torch.dtype) -> bool:
    """Whether int4 weights go in the C kernel's layout (Q4Linear) rather than torch's (Int4Linear)."""
    if dtype != torch.bfloat16:
        return False
    from influence_tui.engine.native import vectorized

    return vectorized()


def make_linear(w: torch.Tensor, bias: torch.Tensor | None, quant: str, dtype: torch.dtype) -> Linear:
    """A layer from a float weight: quant is "none", "int8" or "int4" (int4 falls back to int8
    when the shape does not fit the kernel)."""
    n, k = w.shape
    bias = None if bias is None else bias.to(dtype)
    if quant == "int4" and Q4Linear.supports(n, k) and native_int4(dtype):
        return Q4Linear.from_float(w, bias, dtype)
    if quant == "int4" and Int4Linear.supports(n, k):
        return Int4Linear.from_float(w, bias, dtype)
    if quant in ("int4", "int8"):
        return Int8Linear.from_float(w, bias, dtype)
    return FloatLinear(w.to(dtype), bias)
