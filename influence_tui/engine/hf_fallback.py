"""Fallback for architectures the fast model file does not cover (phi3, gemma, granite, …):
transformers' own implementation from safetensors, behind the same `CausalLM` contract.

Slower (a per-slot `DynamicCache`, one sequence at a time in decode) but it runs what
transformers can run. `trust_remote_code` stays off and only safetensors are read.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch

from influence_tui.engine.base import LoadedModel, ModelLoadError


class HFCausalLM:
    def __init__(self, model: Any, device: torch.device, context_length: int, vocab_size: int) -> None:
        self.model = model
        self.device = device
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.caches: list[Any] = []
        self.max_seq = context_length

    def allocate(self, max_batch: int, max_seq: int) -> None:
        self.caches = [None] * max_batch
        self.max_seq = max_seq
        # transformers renamed past_key_values to cache (5.x, the old name warns until 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor | list[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        from transformers import DynamicCache

        tokens = torch.as_tensor(tokens, dtype=torch.long)
        cache = self.caches[slot]
        if cache is None or start_pos == 0:
            cache = DynamicCache()
        elif cache.get_seq_length() != start_pos:
            if cache.get_seq_length() < start_pos:
                raise RuntimeError(f"slot {slot} holds {cache.get_seq_length()} positions, asked to continue at {start_pos}")
            cache.crop(start_pos)
        n = tokens.numel()
        out = self.model(
            input_ids=tokens.view(1, n).to(self.device),
            use_cache=True,
            cache_position=torch.arange(start_pos, start_pos + n, device=self.device),
            **{self._cache_arg: cache},
        )
        self.caches[slot] = getattr(out, "cache", None) or out.past_key_values
        logits = out.logits[0].float()
        return logits if all_logits else logits[-1]

    def decode(self, slots: list[int] | torch.Tensor, tokens: list[int] | torch.Tensor,
               positions: list[int] | torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        rows = [self.prefill(int(s), tokens[i : i + 1], int(positions[i])) for i, s in enumerate(list(slots))]
        return torch.stack(rows)


def load_hf_model(path: str, device: str = "auto", device_index: int = 0, max_batch: int = 8, max_seq: int = 4096) -> LoadedModel:
    from influence_tui.engine.offline import local_only

    with local_only():
        return _load_hf(path, device, device_index, max_batch, max_seq)


def _load_hf(path: str, device: str, device_index: int, max_batch: int, max_seq: int) -> LoadedModel:
    from influence_tui.engine.loader import resolve_device, resolve_dtype
    from influence_tui.engine.tokenizer import load_folder_tokenizer

    t0 = time.perf_counter()
    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder.name}: no *.safetensors weights (pickle .bin/.pt files are never loaded)")
    config = json.loads((folder / "config.json").read_text())
    arch = str(config.get("model_type", "unknown"))
    dev = resolve_device(device, device_index)
    dtype = resolve_dtype(None, dev)
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=dtype,
        ).to(dev).eval()
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder.name}: architecture {arch!r} is not supported ({first})") from None
    ctx = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    lm = HFCausalLM(model, dev, ctx, int(config.get("vocab_size", 0)))
    lm.allocate(max_batch, min(ctx, max_seq))
    params = sum(p.numel() for p in model.parameters())
    return LoadedModel(
        model=lm, tokenizer=load_folder_tokenizer(folder), name=folder.name, path=str(folder),
        architecture=arch, format="safetensors", quantization=str(dtype).removeprefix("torch."),
        dtype=str(dtype).removeprefix("torch."), device=str(dev), context_length=ctx, parameters=params,
        load_s=time.perf_counter() - t0,
        extra={"weights": "transformers", "max_batch": max_batch, "max_seq": min(ctx, max_seq)},
    )
