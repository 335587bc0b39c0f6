"""Where a model's weights are: a GGUF file or a safetensors folder (no torch here: the kernel's
torch-free model is loaded from these paths too). Pickle weights are refused, never loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influence_tui.engine.base import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Located:
    format: str  # gguf | safetensors
    file: Path | None  # the .gguf
    folder: Path | None  # the safetensors folder


def has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def locate(path: str) -> Located:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".gguf" or has_gguf_magic(p):  # Ollama's blobs have no suffix
            return Located("gguf", p, None)
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{p.name}: pickle weights are never loaded (unsafe); convert to safetensors")
        if p.suffix.lower() == ".safetensors":
            return Located("safetensors", None, p.parent)
        raise ModelLoadError(f"{p.name}: not a model file (expected .gguf or a folder with safetensors)")
    shards = sorted(p.glob("*.safetensors"))
    if shards and (p / "config.json").exists():
        return Located("safetensors", None, p)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return Located("gguf", ggufs[0], None)
    if len(ggufs) > 1:
        raise ModelLoadError(f"{p}: several .gguf files ({', '.join(g.name for g in ggufs)}); choose one")
    pickles = [f for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(f"{pickles[0].name}: pickle weights are never loaded (unsafe); convert to safetensors")
    if shards:
        raise ModelLoadError(f"{p}: config.json is missing next to the safetensors weights")
    raise ModelLoadError(f"{p}: no model weights (.gguf or .safetensors) found")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index.name}: unreadable index ({exc})") from exc
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise ModelLoadError(f"{missing[0]}: shard listed in {index.name} is missing")
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def allocate_and_tokenizer(model: Any, loc: Located, info: dict, max_batch: int, max_seq: int | None) -> Any:
    """What every loader does last: cap the context at a sliding window (attention ignores it:
    never run past it), allocate the KV cache (the model's context capped at 4096 unless asked),
    load the tokenizer, and give the heap that loading freed back to the OS."""
    from influence_tui.engine import tokenizer as tok_mod
    from influence_tui.engine.base import release_freed_heap

    if model.cfg.sliding_window:
        model.context_length = min(model.context_length, int(model.cfg.sliding_window))
    model.allocate(max_batch, min(model.context_length, max_seq or 4096))
    if loc.file is not None:
        tokenizer = tok_mod.load_gguf_tokenizer(loc.file, metadata=info["tokenizer_metadata"])
    else:
        tokenizer = tok_mod.load_folder_tokenizer(loc.folder)  # type: ignore[arg-type]
    release_freed_heap()
    return tokenizer
