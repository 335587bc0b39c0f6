"""Sentence embeddings with BERT-family encoders (the bundled all-MiniLM-L6-v2 by default).

A small hand-written BERT forward over memory-mapped safetensors: no transformers import, so
the first embedding is quick. Mean pooling over real tokens, then L2 normalisation, batched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from influence_tui.library import BUNDLED_EMBED, ModelNotFound, bundled_embedding_path, find_model

MAX_BATCH = 32


def resolve_embedding_model(model: str | None, models_dir: str | None = None) -> tuple[str, str]:
    """(folder, name). None / the bundled names -> all-MiniLM-L6-v2; else a BERT folder from the library."""
    if not model or model.lower().removesuffix(":latest") in (BUNDLED_EMBED.lower(), "minilm"):
        path = bundled_embedding_path()
        if path is None:
            raise ModelNotFound("the bundled embedding model is not installed (run ./setup.sh)")
        return str(path), BUNDLED_EMBED
    info = find_model(model, models_dir=models_dir)
    if info.kind != "embedding" or info.format != "safetensors":
        raise ModelNotFound(f"model {model!r} is not an embedding model (BERT-family safetensors)")
    return info.path, info.name


class Embedder:
    def __init__(self, path: str, name: str = "", device: str = "auto", device_index: int = 0) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        from influence_tui.engine.loader import resolve_device

        self.path, self.name = path, name or Path(path).name
        folder = Path(path)
        self.cfg = json.loads((folder / "config.json").read_text())
        if self.cfg.get("model_type") not in ("bert", "roberta", "xlm-roberta"):
            raise ValueError(f"{self.name}: architecture {self.cfg.get('model_type')!r} is not a supported embedding model")
        self.device = resolve_device(device, device_index)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.max_len = min(int(self.cfg.get("max_position_embeddings", 512)), 512)
        self.tokenizer.enable_truncation(self.max_len)
        self.tokenizer.no_padding()
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.name}: no *.safetensors weights")
        self.w: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), "pt", device="cpu") as fh:
                for key in fh.keys():
                    self.w[key.removeprefix("bert.").removeprefix("roberta.")] = fh.get_tensor(key).float().to(self.device)
        self.heads = int(self.cfg["num_attention_heads"])
        self.layers = int(self.cfg["num_hidden_layers"])
        self.eps = float(self.cfg.get("layer_norm_eps", 1e-12))

    @torch.inference_mode()
    def embed(self, texts: list[str], truncate: bool = True) -> tuple[list[list[float]], int]:
        """Unit vectors of `texts`; a text over the model's length is cut to it, or with
        `truncate=False` refused (ValueError, before anything is computed)."""
        vectors: list[list[float]] = []
        total = 0
        for i in range(0, len(texts), MAX_BATCH):
            chunk = texts[i : i + MAX_BATCH]
            encs = self.tokenizer.encode_batch(chunk)
            long = next((j for j, e in enumerate(encs) if e.overflowing), None)
            if not truncate and long is not None:
                raise ValueError(f"input {i + long} is longer than the {self.max_len} tokens {self.name} takes "
                                 "(shorten it, or allow truncation)")
            total += sum(len(e.ids) for e in encs)
            vectors.extend(self._forward(encs).tolist())
        return vectors, total

    def _forward(self, encs: list) -> torch.Tensor:
        width = max(len(e.ids) for e in encs)
        ids = torch.zeros((len(encs), width), dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.bool)
        for row, e in enumerate(encs):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        w = self.w
        pos = torch.arange(width, device=self.device)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = self._norm(x, "embeddings.LayerNorm")
        attn_mask = mask[:, None, None, :]
        for i in range(self.layers):
            x = self._layer(x, attn_mask, f"encoder.layer.{i}.")
        # mean over real tokens, then unit length: what sentence-transformers does for this model
        m = mask.unsqueeze(-1).float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1).cpu()

    def _layer(self, x: torch.Tensor, attn_mask: torch.Tensor, p: str) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads

        def heads(name: str) -> torch.Tensor:
            return self._linear(x, p + f"attention.self.{name}").view(b, t, self.heads, hd).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads("query"), heads("key"), heads("value"), attn_mask=attn_mask)
        a = a.transpose(1, 2).reshape(b, t, d)
        x = self._norm(x + self._linear(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = F.gelu(self._linear(x, p + "intermediate.dense"))
        return self._norm(x + self._linear(h, p + "output.dense"), p + "output.LayerNorm")

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], self.eps)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)
