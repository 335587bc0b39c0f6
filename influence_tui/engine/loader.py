"""Path -> LoadedModel: GGUF files and safetensors folders onto the fast Llama-family model.

Only local files are read (the offline switches are on while loading) and never pickle: `.bin`/`.pt`
weights are refused. Architectures other than llama/mistral/qwen2/qwen3 raise `UnsupportedArchitecture`
so that the scheduler can hand a safetensors folder to the transformers fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from influence_tui.engine import weights_cache
from influence_tui.engine.base import LoadedModel, ModelLoadError
from influence_tui.engine.offline import local_only
from influence_tui.engine.sources import Located as _Located
from influence_tui.engine.sources import allocate_and_tokenizer, locate
from influence_tui.engine.sources import safetensors_files as _safetensors_files
from influence_tui.engine.model import Embedding, Layer, LlamaModel, ModelConfig
from influence_tui.engine.quant import FloatLinear, Int4Linear, Int8Linear, Q4Linear, make_linear, native_int4, quantize_int4
from influence_tui.formats.gguf_tensors import GGUFTensors, Q4Blocks

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedArchitecture(ModelLoadError):
    """The fast model does not implement this architecture (the transformers fallback may)."""

    def __init__(self, architecture: str, path: str) -> None:
        super().__init__(
            f"{Path(path).name}: architecture {architecture!r} is not supported by the built-in engine "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
        self.architecture = architecture
        self.path = path


# -- device and dtype --------------------------------------------------------------------------
def resolve_device(device: str = "auto", device_index: int = 0) -> torch.device:
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", device_index)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = device.split(":")[0]
    if ":" in device:
        device_index = int(device.split(":")[1])
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' is not available (this torch build or machine has no CUDA GPU)")
        if device_index >= torch.cuda.device_count():
            raise ModelLoadError(f"device 'cuda:{device_index}' is not available ({torch.cuda.device_count()} GPUs)")
        return torch.device("cuda", device_index)
    if kind == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' is not available (Apple Metal is not present)")
        return torch.device("mps")
    if kind == "cpu":
        return torch.device("cpu")
    raise ModelLoadError(f"unknown device {device!r} (expected auto, cpu, cuda, cuda:N or mps)")


def cpu_has_bf16() -> bool:
    """True where bf16 matmuls are fast on this CPU (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        flags = []
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return True
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_bf16" in flags


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype and dtype != "auto":
        if dtype.lower() not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r} (expected auto, float32, float16 or bfloat16)")
        return _DTYPES[dtype.lower()]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


# -- weight sources ----------------------------------------------------------------------------
class WeightSource(Protocol):
    interleaved_qk: bool  # q/k rows already in the interleaved RoPE layout (llama.cpp's llama)

    def has(self, name: str) -> bool: ...
    def float(self, name: str) -> torch.Tensor: ...
    def q4(self, name: str) -> Q4Blocks | None: ...


# canonical names are llama.cpp's (short); safetensors maps onto them
_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(name: str) -> str:
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{_HF_LAYER.get(rest, rest)}"


class GGUFSource:
    def __init__(self, tensors: GGUFTensors, interleaved_qk: bool) -> None:
        self.t = tensors
        self.interleaved_qk = interleaved_qk

    def has(self, name: str) -> bool:
        return name in self.t

    def float(self, name: str) -> torch.Tensor:
        return self.t.dequantize(name)

    def q4(self, name: str) -> Q4Blocks | None:
        return self.t.q4_blocks(name)


class SafetensorsSource:
    interleaved_qk = False

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.files = files
        self.handles = []
        self.where: dict[str, object] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise ModelLoadError(f"{f.name}: not a readable safetensors file ({exc})") from exc
            self.handles.append(h)
            for key in h.keys():
                self.where[key] = h

    def has(self, name: str) -> bool:
        return _hf_name(name) in self.where

    def float(self, name: str) -> torch.Tensor:
        key = _hf_name(name)
        return self.where[key].get_tensor(key)  # type: ignore[attr-defined]

    def q4(self, name: str) -> Q4Blocks | None:
        return None


# -- configs -----------------------------------------------------------------------------------
def config_from_hf(cfg: dict, path: str) -> ModelConfig:
    arch = cfg.get("model_type", "unknown")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitecture(arch, path)
    heads = cfg["num_attention_heads"]
    dim = cfg["hidden_size"]
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or dim // heads,
        ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
        context_length=cfg.get("max_position_embeddings", 4096),
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None,
    )


def config_from_gguf(t: GGUFTensors, path: str) -> ModelConfig:
    md = t.header.metadata
    arch = t.header.architecture
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitecture(arch, path)

    def get(key: str, default=None):
        return md.get(f"{arch}.{key}", default)

    dim = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = get("vocab_size") or t.shape("token_embd.weight")[0]
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor", 1.0)}
    factors = t.dequantize("rope_freqs.weight").tolist() if "rope_freqs.weight" in t else None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=heads,
        n_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", dim // heads))),
        ffn_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        context_length=int(get("context_length", 4096)),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in t,
        qkv_bias="blk.0.attn_q.bias" in t,
        qk_norm="blk.0.attn_q_norm.weight" in t,
        sliding_window=get("attention.sliding_window"),
        rope_freq_factors=factors,
    )


# -- building the model ------------------------------------------------------------------------
def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half (HF) to interleaved RoPE layout (also biases)."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class _Builder:
    src: WeightSource
    cfg: ModelConfig
    quant: str  # none | int8 | int4
    dtype: torch.dtype
    device: torch.device

    def _rows_fn(self, part: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The row permutation that brings a q/k tensor into interleaved layout (identity otherwise)."""
        if self.src.interleaved_qk or part not in ("attn_q", "attn_k"):
            return lambda x: x
        heads = self.cfg.n_heads if part == "attn_q" else self.cfg.n_kv_heads
        return lambda x: to_interleaved(x, heads)

    def linear(self, prefix: str, parts: list[str]):
        """One (possibly fused) linear layer from the parts' weights, concatenated on rows."""
        names = [f"{prefix}.{p}.weight" for p in parts]
        biases = [f"{prefix}.{p}.bias" for p in parts]
        bias = None
        if any(self.src.has(b) for b in biases):
            bias = torch.cat([self._rows_fn(p)(self.src.float(b).float()) for p, b in zip(parts, biases)])
            bias = bias.to(self.device, self.dtype)
        if self.quant == "int4" and self.device.type == "cpu":
            fused = [self._q4_parts(p, n) for p, n in zip(parts, names)]
            q = torch.cat([f[0] for f in fused])
            if Q4Linear.supports(*q.shape) and native_int4(self.dtype):  # the C kernel's layout
                scale = torch.cat([f[1] for f in fused])
                minimum = torch.cat([f[2] for f in fused])
                return Q4Linear.from_parts(q, scale, minimum, bias, self.dtype)
            if Int4Linear.supports(*q.shape):
                scale = torch.cat([f[1] for f in fused])
                minimum = torch.cat([f[2] for f in fused])
                return Int4Linear.from_parts(q, scale, minimum + 8 * scale, bias, self.dtype)
        w = torch.cat([self._rows_fn(p)(self.src.float(n)) for p, n in zip(parts, names)])
        if self.device.type != "cpu" or self.quant == "none":
            return FloatLinear(w.to(self.device, self.dtype), bias)
        return make_linear(w, bias, self.quant, self.dtype)

    def _q4_parts(self, part: str, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self._rows_fn(part)
        blocks = self.src.q4(name)
        if blocks is not None:  # the file's own nibbles: no re-quantisation
            return rows(blocks.q), rows(blocks.scale), rows(blocks.minimum)
        return tuple(rows(x) for x in quantize_int4(self.src.float(name)))  # type: ignore[return-value]

    def norm(self, name: str) -> torch.Tensor:
        return self.src.float(name).to(self.device, self.dtype)

    def head_norm(self, name: str) -> torch.Tensor | None:
        """A per-head q/k norm's weight (Qwen3), in the layout the q/k rows are brought to."""
        if not self.cfg.qk_norm:
            return None
        w = self.src.float(name).float()
        return (w if self.src.interleaved_qk else to_interleaved(w, 1)).to(self.device)

    def build(self) -> LlamaModel:
        cfg = self.cfg
        layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}"
            layers.append(
                Layer(
                    attn_norm=self.norm(f"{p}.attn_norm.weight"),
                    qkv=self.linear(p, ["attn_q", "attn_k", "attn_v"]),
                    o=self.linear(p, ["attn_output"]),
                    ffn_norm=self.norm(f"{p}.ffn_norm.weight"),
                    gate_up=self.linear(p, ["ffn_gate", "ffn_up"]),
                    down=self.linear(p, ["ffn_down"]),
                    q_norm=self.head_norm(f"{p}.attn_q_norm.weight"),
                    k_norm=self.head_norm(f"{p}.attn_k_norm.weight"),
                )
            )
        embed_w = self.src.float("token_embd.weight")
        quantized = self.quant != "none" and self.device.type == "cpu"
        if quantized:
            # one int8 table for the lookup and a tied lm_head. (int4 would halve the head's
            # per-token reads, ~1 ms here, but drops greedy top-1 agreement with the float model on
            # the bundled SmolLM2 from >90% to 83%.)
            table = Int8Linear.from_float(embed_w, None, self.dtype)
            embed = Embedding(table)
        else:
            table = embed_w.to(self.device, self.dtype)
            embed = Embedding(table)
        del embed_w
        if cfg.tie_embeddings or not self.src.has("output.weight"):
            lm_head = table if quantized else FloatLinear(table)
        else:
            lm_head = self._head()
        return LlamaModel(cfg, embed, layers, self.norm("output_norm.weight"), lm_head, self.dtype, self.device)

    def _head(self):
        w = self.src.float("output.weight")
        if self.device.type != "cpu" or self.quant == "none":
            return FloatLinear(w.to(self.device, self.dtype))
        return Int8Linear.from_float(w, None, self.dtype)


# -- converted-weights cache (see weights_cache) ----------------------------------------------
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
              "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def weights_cache_key(sources: list[Path], quant: str, dtype: torch.dtype) -> tuple[Path, str]:
    """The cache file for these sources and settings, and its identity (see weights_cache)."""
    layout = "q4native" if quant in ("auto", "int4") and native_int4(dtype) else "torch"
    args = (sources, quant, str(dtype), torch.__version__, layout)
    return weights_cache.cache_path(*args), weights_cache.cache_identity(*args)


def save_converted(path: Path, model: LlamaModel, info: dict, identity: str = "") -> None:
    """Write the converted weights to `path` (atomically), then remove the cache files they
    replace (`weights_cache.prune`)."""
    tensors = {k: (_ST_NAMES[v.dtype], list(v.shape), v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
               for k, v in model.state_tensors().items()}
    meta = {"config": json.dumps(dataclasses.asdict(model.cfg)), "info": json.dumps(info),
            "version": str(weights_cache.WEIGHTS_CACHE_VERSION), "identity": identity}
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_cache.remove_orphans(path.parent, ("*.*.tmp",))  # an earlier save that was interrupted
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        weights_cache.write_aligned(tmp, tensors, meta)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full or read-only disk only costs speed
        return
    weights_cache.prune(path.parent, path, identity)


def read_safetensors_mmap(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Zero-copy tensors over a memory map (safetensors' own reader copies into RAM). Every cache
    file of this version comes from `weights_cache.write_aligned`, so every tensor starts at a
    multiple of 64 bytes, as torch's int8/int4 CPU kernels need (an older file is only read for its
    version, then rebuilt)."""
    mm, entries, meta = weights_cache.read_mmap(path)
    with warnings.catch_warnings():  # read-only memory: the weights are never written
        warnings.simplefilter("ignore", UserWarning)
        whole = torch.from_numpy(mm)  # slicing a tensor is ~50x cheaper than slicing a memmap
    out = {name: whole[a:b].view(_ST_DTYPES[dt]).reshape(shape) for name, (dt, shape, a, b) in entries.items()}
    return out, meta


def load_converted(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[LlamaModel, dict] | None:
    try:
        tensors, meta = read_safetensors_mmap(path)
        if meta.get("version") != str(weights_cache.WEIGHTS_CACHE_VERSION):
            return None
        cfg = ModelConfig(**json.loads(meta["config"]))
        return LlamaModel.from_state(cfg, tensors, dtype, device), json.loads(meta["info"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # a damaged cache entry is rebuilt


def _default_quant(fmt: str, file_quant: str, device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cpu":
        return "none"
    if fmt == "gguf" and dtype == torch.bfloat16:
        wide = file_quant.upper() in ("F32", "F16", "BF16", "Q8_0", "Q6_K")
        return "int8" if wide else "int4"
    return "int8" if dtype == torch.bfloat16 else "none"


def load_model(
    path: str,
    device: str = "auto",
    device_index: int = 0,
    dtype: str | None = None,
    quant: str | None = None,
    max_batch: int = 8,
    max_seq: int | None = None,
    cache: bool = True,
) -> LoadedModel:
    """Load a GGUF file or safetensors folder. quant: None/"auto", "none", "int8", "int4".

    The KV cache is allocated for `max_batch` slots of `max_seq` positions (default: the model's
    context length capped at 4096; memory is only resident where slots are written on CPU).
    `cache`: keep CPU-quantised weights converted on disk (user cache dir) for fast reloads.
    """
    # local files only: the libraries' offline switches are on while loading and put back after
    with local_only():
        return _load(path, device, device_index, dtype, quant, max_batch, max_seq, cache)


def _load(
    path: str, device: str, device_index: int, dtype: str | None, quant: str | None,
    max_batch: int, max_seq: int | None, cache: bool,
) -> LoadedModel:
    t0 = time.perf_counter()
    dev = resolve_device(device, device_index)
    loc = locate(path)
    torch_dtype = resolve_dtype(dtype, dev)
    requested = (quant or "auto").lower()
    if requested not in ("auto", "none", "int8", "int4"):
        raise ModelLoadError(f"unknown quantization {quant!r} (expected auto, none, int8 or int4)")
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    sources = [loc.file] if loc.file is not None else _safetensors_files(loc.folder)  # type: ignore[arg-type]
    model_path = loc.file or loc.folder
    assert model_path is not None
    cached, identity = weights_cache_key(sources, requested, torch_dtype) if cache and dev.type == "cpu" else (None, "")
    hit = load_converted(cached, torch_dtype, dev) if cached is not None and cached.exists() else None
    if hit is not None:  # no GGUF header parse, no weight conversion
        model, info = hit
    else:
        model, info = _build(loc, sources, requested, dev, torch_dtype)
        if cached is not None and info["weights"] != "none":
            save_converted(cached, model, info, identity)
    cfg = model.cfg
    tokenizer = allocate_and_tokenizer(model, loc, info, max_batch, max_seq)
    ctx = model.context_length
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=info["name"],
        path=str(model_path),
        architecture=cfg.architecture,
        format=loc.format,
        quantization=info["quantization"],
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(dev),
        context_length=ctx,
        parameters=info["parameters"],
        load_s=time.perf_counter() - t0,
        extra={"weights": info["weights"], "max_batch": max_batch, "max_seq": model.max_seq, "config": cfg,
               "cached": hit is not None},
    )


def _build(
    loc: _Located, sources: list[Path], requested: str, dev: torch.device, torch_dtype: torch.dtype
) -> tuple[LlamaModel, dict]:
    """Read the source files and convert the weights: the slow path of `load_model`."""
    info: dict = {"tokenizer_metadata": {}}
    if loc.file is not None:
        try:
            tensors = GGUFTensors(loc.file)
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"{loc.file.name}: cannot read GGUF ({exc})") from exc
        cfg = config_from_gguf(tensors, str(loc.file))
        # llama.cpp stores llama/mistral q/k interleaved; qwen2 and qwen3 keep Hugging Face's layout
        src: WeightSource = GGUFSource(tensors, interleaved_qk=cfg.architecture in ("llama", "mistral"))
        md = tensors.header.metadata
        info.update(
            quantization=tensors.header.quantization,
            name=str(md.get("general.name") or loc.file.stem),
            parameters=tensors.header.parameter_count,
            # what the tokenizer needs besides the big arrays (kept in the weights cache)
            tokenizer_metadata={k: v for k, v in md.items() if k.startswith("tokenizer.") and not isinstance(v, list)},
        )
        model_path = loc.file
    else:
        assert loc.folder is not None
        try:
            hf_cfg = json.loads((loc.folder / "config.json").read_text())
        except ValueError as exc:
            raise ModelLoadError(f"config.json in {loc.folder}: invalid JSON ({exc})") from exc
        cfg = config_from_hf(hf_cfg, str(loc.folder))
        st = SafetensorsSource(sources)
        src = st
        file_quant = str(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "unknown")
        info.update(
            quantization={"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(file_quant, file_quant),
            name=loc.folder.name,
            parameters=_count_safetensors(st),
        )
        model_path = loc.folder
    q = requested
    if q == "auto":
        q = _default_quant(loc.format, info["quantization"], dev, torch_dtype)
    if dev.type != "cpu":
        q = "none"
    info["weights"] = q
    try:
        model = _Builder(src, cfg, q, torch_dtype, dev).build()
    except (KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{model_path.name}: broken or incomplete weights ({type(exc).__name__}: {exc})") from exc
    return model, info


def _count_safetensors(src: SafetensorsSource) -> int:
    total = 0
    for h in src.handles:
        for key in h.keys():  # type: ignore[attr-defined]
            total += _numel(h.get_slice(key).get_shape())  # type: ignore[attr-defined]
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
