"""Rotary position tables, in numpy: the torch model and the kernel's torch-free model build
their kernel tables here, so both hand the kernel the same bits."""

from __future__ import annotations

import math

import numpy as np

from influence_tui.engine.base import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim/2] (float64), with llama3 / linear scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if cfg.rope_freq_factors is not None:  # GGUF llama3 files carry the factors as a tensor
        return inv / np.asarray(cfg.rope_freq_factors, dtype=np.float64)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope scaling {kind!r} is not supported")
    return inv


def angles(cfg: ModelConfig, max_seq: int) -> np.ndarray:
    """float32 [max_seq, head_dim/2]: position times inverse frequency, each product in float32."""
    return np.outer(np.arange(max_seq, dtype=np.float32), inv_freq(cfg).astype(np.float32))


def kernel_tables(cfg: ModelConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 [max_seq, head_dim/2], contiguous: the decode kernel's tables."""
    a = angles(cfg, max_seq)
    return np.ascontiguousarray(np.cos(a)), np.ascontiguousarray(np.sin(a))
