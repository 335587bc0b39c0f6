import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from influence_tui.library import find_model, list_models, ModelNotFound, scan_hf_cache


def write_safetensors_model(folder: Path, shards: int = 1, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256, "architectures": ["LlamaForCausalLM"]}))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    tensors = {f"layer{i}.weight": np.zeros((16, 8), dtype=np.float16) for i in range(4)}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            part = {n: tensors[n] for n in names[s::shards]}
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def write_gguf(path: Path, qtype: str = "Q8_0", arch: str = "llama") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(w, q), raw_dtype=q)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def by_name(models):
    return {m.name: m for m in models}


def test_bundled_smollm2_is_listed_with_facts_from_its_header():
    models = by_name(list_models("/nonexistent"))
    m = models["SmolLM2-135M-Instruct"]
    assert (m.format, m.quantization, m.architecture, m.status) == ("gguf", "Q4_1", "llama", "ok")
    assert 130e6 < m.parameters < 140e6
    assert m.context_length == 8192
    assert 90 < m.size_bytes / 2**20 < 100
    assert models["all-MiniLM-L6-v2"].kind == "embedding"


def test_models_dir_layouts(tmp_path):
    root = tmp_path / "models"
    write_safetensors_model(root / "org_tiny")
    write_safetensors_model(root / "org_sharded", shards=2)
    write_gguf(root / "loose.gguf", "Q8_0")
    (root / "org_ggufs").mkdir()
    write_gguf(root / "org_ggufs" / "m.Q4_0.gguf", "Q4_0")
    write_gguf(root / "org_ggufs" / "m.Q8_0.gguf", "Q8_0")
    models = by_name(list_models(root, include_hf_cache=False, include_bundled=False))
    assert models["org_tiny"].format == "safetensors" and models["org_tiny"].usable
    assert models["org_tiny"].parameters == 4 * 16 * 8 and models["org_tiny"].quantization == "F16"
    assert models["org_sharded"].usable and models["org_sharded"].parameters == 4 * 16 * 8
    assert models["loose"].quantization == "Q8_0" and models["loose"].usable
    # quant comes from the tensors, not the file name
    assert models["org_ggufs/m.Q4_0"].quantization == "Q4_0"
    assert models["org_ggufs/m.Q8_0"].quantization == "Q8_0"


def test_quant_is_read_from_tensors_not_the_name(tmp_path):
    write_gguf(tmp_path / "model.Q4_K_M.gguf", "Q8_0")
    (m,) = list_models(tmp_path, include_hf_cache=False, include_bundled=False)
    assert m.quantization == "Q8_0"


def write_ollama_model(root: Path, name: tuple[str, str, str, str], blob_source: Path | None) -> Path:
    """An Ollama store entry as `ollama pull` leaves it: a manifest naming a GGUF blob by digest."""
    import hashlib

    digest = "sha256:" + hashlib.sha256(str(name).encode()).hexdigest()
    manifest = root / "manifests" / Path(*name)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1},
              {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1}]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    if blob_source is not None:
        blob = root / "blobs" / digest.replace(":", "-")
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.symlink_to(blob_source)
    return manifest


def test_models_pulled_with_ollama_are_listed_by_their_ollama_names(tmp_path, monkeypatch):
    root = tmp_path / "ollama"
    gguf = write_gguf(tmp_path / "w.gguf", "Q8_0")
    write_ollama_model(root, ("registry.ollama.ai", "library", "tiny", "latest"), gguf)
    write_ollama_model(root, ("hf.co", "org", "repo-GGUF", "Q8_0"), gguf)
    write_ollama_model(root, ("registry.ollama.ai", "library", "gone", "7b"), None)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    models = by_name(list_models(tmp_path / "none", include_hf_cache=False, include_bundled=False))
    assert set(models) == {"tiny:latest", "hf.co/org/repo-GGUF:Q8_0", "gone:7b"}
    tiny = models["tiny:latest"]
    assert (tiny.source, tiny.format, tiny.quantization, tiny.usable) == ("ollama", "gguf", "Q8_0", True)
    assert find_model("tiny", list(models.values())).name == "tiny:latest"  # as `ollama run tiny` would
    assert models["gone:7b"].status == "unusable" and "missing" in models["gone:7b"].reason


def test_models_downloaded_with_lm_studio_are_listed(tmp_path, monkeypatch):
    root = tmp_path / "lmstudio"
    (root / "lmstudio-community" / "Tiny-GGUF").mkdir(parents=True)
    write_gguf(root / "lmstudio-community" / "Tiny-GGUF" / "Tiny-Q8_0.gguf", "Q8_0")
    monkeypatch.setenv("INFLUENCE_LMSTUDIO_DIR", str(root))
    (m,) = list_models(tmp_path / "none", include_hf_cache=False, include_bundled=False)
    assert (m.name, m.source, m.quantization) == ("lmstudio-community/Tiny-GGUF", "lmstudio", "Q8_0")
    assert list_models(tmp_path / "none", include_hf_cache=False, include_bundled=False, include_other_apps=False) == []


def test_a_gguf_replaced_on_disk_is_read_again(tmp_path):
    """Headers are remembered per (path, size, mtime): a file swapped for another is seen as it is now."""
    import os

    p = write_gguf(tmp_path / "m.gguf", "Q8_0")
    (m,) = list_models(tmp_path, include_hf_cache=False, include_bundled=False)
    assert m.quantization == "Q8_0"
    write_gguf(tmp_path / "m.gguf", "F16")
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 1_000_000))  # even within one clock tick
    (m,) = list_models(tmp_path, include_hf_cache=False, include_bundled=False)
    assert m.quantization == "F16"
    p.write_bytes(p.read_bytes()[:-100])
    (m,) = list_models(tmp_path, include_hf_cache=False, include_bundled=False)
    assert m.status == "unusable" and "truncated" in m.reason


def test_a_tokenizer_vocabulary_of_long_strings_is_skipped_exactly(tmp_path):
    """Listing skips a header's big string arrays without parsing them; what follows them must
    still be read right (strings longer than the read-ahead block included)."""
    import gguf

    from influence_tui.formats.gguf import read_gguf_header

    path = tmp_path / "v.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"tok{i}" * (i % 7) for i in range(5000)] + ["x" * (3 << 20), "y"])
    writer.add_context_length(321)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fast, full = read_gguf_header(path, skip_arrays=True), read_gguf_header(path)
    assert fast.context_length == full.context_length == 321
    assert fast.data_offset == full.data_offset and fast.tensors == full.tensors


@pytest.mark.parametrize(
    "breakage,reason",
    [
        ("truncated_gguf", "truncated"),
        ("not_gguf", "not a GGUF"),
        ("missing_shard", "missing shard"),
        ("no_tokenizer", "no tokenizer"),
        ("pickle_only", "pickle"),
        ("partial", "partial download"),
        ("no_weights", "no weights"),
        ("truncated_safetensors", "truncated"),
    ],
)
def test_broken_models_are_listed_unusable_with_reason(tmp_path, breakage, reason):
    root = tmp_path / "models"
    root.mkdir()
    if breakage == "truncated_gguf":
        p = write_gguf(root / "t.gguf")
        p.write_bytes(p.read_bytes()[:-100])
    elif breakage == "not_gguf":
        (root / "x.gguf").write_bytes(b"hello world, not a model")
    elif breakage == "missing_shard":
        f = write_safetensors_model(root / "org_m", shards=2)
        next(f.glob("model-00002*")).unlink()
    elif breakage == "no_tokenizer":
        write_safetensors_model(root / "org_m", tokenizer=False)
    elif breakage == "pickle_only":
        (root / "org_m").mkdir()
        (root / "org_m" / "config.json").write_text("{}")
        (root / "org_m" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif breakage == "partial":
        write_safetensors_model(root / "org_m")
        (root / "org_m" / ".influence-download.json").write_text("{}")
    elif breakage == "no_weights":
        (root / "org_m").mkdir()
        (root / "org_m" / "config.json").write_text("{}")
    elif breakage == "truncated_safetensors":
        f = write_safetensors_model(root / "org_m")
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(data[:-10])
    (m,) = list_models(root, include_hf_cache=False, include_bundled=False)
    assert m.status == "unusable" and reason in m.reason


def test_hf_cache_layout(tmp_path):
    repo = tmp_path / "models--Org--Tiny"
    write_safetensors_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (m,) = scan_hf_cache(tmp_path)
    assert m.name == "Org/Tiny" and m.usable and m.source == "hf-cache"


def test_find_model_by_name_alias_and_path(tmp_path):
    write_safetensors_model(tmp_path / "org_tiny")
    assert find_model("smollm2").name == "SmolLM2-135M-Instruct"
    assert find_model("smollm2:latest").name == "SmolLM2-135M-Instruct"
    assert find_model("org_tiny", models_dir=tmp_path).path.endswith("org_tiny")
    assert find_model(str(tmp_path / "org_tiny")).format == "safetensors"
    with pytest.raises(ModelNotFound, match="nope"):
        find_model("nope", models_dir=tmp_path)


def test_list_command_json_and_no_torch(tmp_path):
    write_safetensors_model(tmp_path / "models" / "org_tiny")
    (tmp_path / "models" / "broken.gguf").write_bytes(b"garbage")
    code = "import sys, runpy; sys.argv=['influence','list','--json','--models-dir',sys.argv[1]]\nfrom influence_tui.cli import main\nrc=main(sys.argv[1:])\nassert 'torch' not in sys.modules\nraise SystemExit(rc)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "models")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["org_tiny"]["status"] == "ok"
    assert rows["broken"]["status"] == "unusable"
    assert rows["SmolLM2-135M-Instruct"]["quantization"] == "Q4_1"
    text = subprocess.run([sys.executable, "-m", "influence_tui", "list", "--models-dir", str(tmp_path / "models")], capture_output=True, text=True)
    assert text.returncode == 0 and "SmolLM2-135M-Instruct" in text.stdout and "Q4_1" in text.stdout
    # the table lists what loads; the broken file is counted, and --all shows it with its reason
    assert "broken" not in text.stdout and "1 more model cannot be used here" in text.stdout
    every = subprocess.run([sys.executable, "-m", "influence_tui", "list", "--all", "--models-dir", str(tmp_path / "models")],
                           capture_output=True, text=True)
    assert "broken" in every.stdout and "unusable" in every.stdout and "cannot be used" not in every.stdout


def test_capabilities_come_from_the_chat_template(tmp_path: Path) -> None:
    """What `influence list` and /api/show say a model can do: tools and thinking where its chat
    template renders tools or handles think blocks (the engine reads the template the same way)."""
    pytest.importorskip("torch")
    from influence_tui.library import inspect_folder
    from tests.tiny_models import write_tiny_thinker, write_tiny_tool_caller

    caller = inspect_folder(write_tiny_tool_caller(tmp_path / "caller"), "caller", "models")
    thinker = inspect_folder(write_tiny_thinker(tmp_path / "thinker"), "thinker", "models")
    assert caller.capabilities == ["completion", "tools"] and thinker.capabilities == ["completion", "thinking"]


def test_the_bundled_models_capabilities(bundled_gguf: Path) -> None:
    from influence_tui.library import inspect_gguf

    assert inspect_gguf(bundled_gguf, "smollm2", "bundled").capabilities == ["completion"]  # its template takes no tools
