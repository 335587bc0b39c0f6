"""The fast Llama-family model against transformers' implementation, and its KV cache semantics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from influence_tui.engine.base import ModelLoadError  # noqa: E402
from influence_tui.engine.loader import UnsupportedArchitecture, load_model  # noqa: E402
from tests.tiny_models import _hf_model, write_tiny_gguf, write_tiny_llama_safetensors  # noqa: E402

TOKENS = [5, 17, 42, 99, 3, 250, 300, 7, 64, 128, 11, 200, 33, 1, 77, 150, 180, 190, 260, 21]


def _hf_logits(model, ids: list[int]) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_safetensors_float_matches_transformers(tiny_dir: Path, arch: str) -> None:
    folder = write_tiny_llama_safetensors(tiny_dir / f"st-{arch}", arch=arch)
    lm = load_model(str(folder), device="cpu", dtype="float32", quant="none", max_batch=2, max_seq=64)
    assert lm.architecture == arch and lm.format == "safetensors"
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = lm.model.prefill(0, torch.tensor(TOKENS), 0, all_logits=True)
    assert (ours - _hf_logits(ref, TOKENS)).abs().max().item() < 1e-3


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2", "F16"),
                                        ("qwen3", "F32")])
def test_gguf_float_matches_transformers(tiny_dir: Path, arch: str, qtype: str) -> None:
    path = write_tiny_gguf(tiny_dir / f"{arch}-{qtype}.gguf", arch=arch, qtype=qtype)
    lm = load_model(str(path), device="cpu", dtype="float32", quant="none", max_batch=1, max_seq=64)
    assert lm.format == "gguf" and lm.quantization == qtype
    if arch == "qwen3":  # transformers' GGUF reader ignores qwen3's key_length: the model it was written from
        ref = _hf_model(arch, lm.model.vocab_size, seed=0)
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = lm.model.prefill(0, torch.tensor(TOKENS), 0, all_logits=True)
    assert (ours - _hf_logits(ref, TOKENS)).abs().max().item() < 1e-3


@pytest.fixture(scope="module")
def tiny_fp32(tiny_dir: Path):
    folder = write_tiny_llama_safetensors(tiny_dir / "cache-llama", arch="llama", seed=1)
    return load_model(str(folder), device="cpu", dtype="float32", quant="none", max_batch=4, max_seq=64).model


def test_prefill_reuses_cached_prefix(tiny_fp32) -> None:
    m = tiny_fp32
    fresh = m.prefill(1, torch.tensor(TOKENS), 0, all_logits=True)
    m.prefill(0, torch.tensor(TOKENS[:8]), 0)
    tail = m.prefill(0, torch.tensor(TOKENS[8:]), 8, all_logits=True)
    assert torch.allclose(tail, fresh[8:], atol=1e-4)
    # one token at a time through decode gives the same last logits
    last = m.decode(torch.tensor([0]), torch.tensor([TOKENS[-1]]), torch.tensor([len(TOKENS) - 1]))
    assert torch.allclose(last[0], fresh[-1], atol=1e-4)


def test_batched_decode_equals_single(tiny_fp32) -> None:
    m = tiny_fp32
    prompts = {3: TOKENS[:5], 0: TOKENS[2:14], 2: TOKENS[:9]}  # slots out of order, different lengths
    nxt = {3: 7, 0: 8, 2: 9}
    alone = {}
    for slot, p in prompts.items():
        m.prefill(slot, torch.tensor(p), 0)
        alone[slot] = m.decode(torch.tensor([slot]), torch.tensor([nxt[slot]]), torch.tensor([len(p)]))[0]
    for slot, p in prompts.items():  # rewrite the caches, then one batched step
        m.prefill(slot, torch.tensor(p), 0)
    slots = list(prompts)
    out = m.decode(torch.tensor(slots), torch.tensor([nxt[s] for s in slots]),
                   torch.tensor([len(prompts[s]) for s in slots]))
    assert out.shape == (3, m.vocab_size) and out.dtype == torch.float32
    for row, slot in enumerate(slots):
        assert torch.allclose(out[row], alone[slot], atol=1e-4)


def test_int4_and_int8_close_to_float_on_tiny(tiny_dir: Path) -> None:
    path = write_tiny_gguf(tiny_dir / "q4.gguf", arch="llama", qtype="Q4_1")
    ref = load_model(str(path), device="cpu", dtype="float32", quant="none", max_batch=1, max_seq=64).model
    base = ref.prefill(0, torch.tensor(TOKENS), 0, all_logits=True)
    for quant in ("int4", "int8"):
        m = load_model(str(path), device="cpu", dtype="bfloat16", quant=quant, max_batch=1, max_seq=64).model
        # short prompts go through the int4/int8 kernels, long ones through dequantised matmuls
        got = torch.cat([m.prefill(0, torch.tensor(TOKENS[:4]), 0, all_logits=True),
                         m.prefill(0, torch.tensor(TOKENS[4:]), 4, all_logits=True)])
        cos = torch.nn.functional.cosine_similarity(got, base, dim=-1)
        assert cos.min().item() > 0.98, quant


# -- loader errors -------------------------------------------------------------------------------
def test_refuses_pickle(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        load_model(str(tmp_path), device="cpu")


def test_truncated_gguf(tiny_dir: Path, tmp_path: Path) -> None:
    data = write_tiny_gguf(tiny_dir / "trunc-src.gguf", qtype="F16").read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(bad), device="cpu")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitecture, match="gpt_neox"):
        load_model(str(tmp_path), device="cpu")


def test_absent_device(tiny_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="device 'cuda' is not available"):
        load_model(str(tiny_dir / "q4.gguf"), device="cuda")


# -- the bundled model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled(bundled_gguf: Path):
    return load_model(str(bundled_gguf), device="cpu", dtype="float32", quant="none", max_batch=2, max_seq=256)


@pytest.fixture(scope="module")
def bundled_hf(bundled_gguf: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        bundled_gguf.parent, gguf_file=bundled_gguf.name, dtype=torch.float32
    ).eval()


def _prompt_ids(lm) -> list[int]:
    tok = lm.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}]))


@pytest.mark.slow
def test_bundled_fp32_matches_transformers(bundled, bundled_hf) -> None:
    ids = _prompt_ids(bundled)
    ours = bundled.model.prefill(0, torch.tensor(ids), 0, all_logits=True)
    assert (ours - _hf_logits(bundled_hf, ids)).abs().max().item() < 2e-3
    # greedy continuation of 32 tokens is the same token for token
    with torch.no_grad():
        ref = bundled_hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    ref_new = ref[0, len(ids):].tolist()
    got, logits, pos = [], ours[-1], len(ids)
    for _ in range(32):
        t = int(logits.argmax())
        got.append(t)
        logits = bundled.model.decode(torch.tensor([0]), torch.tensor([t]), torch.tensor([pos]))[0]
        pos += 1
    assert got == ref_new


@pytest.mark.slow
def test_bundled_int4_agrees_with_float(bundled, bundled_gguf: Path) -> None:
    fast = load_model(str(bundled_gguf), device="cpu", max_batch=2, max_seq=256)
    assert fast.extra["weights"] in ("int4", "int8")
    ids = _prompt_ids(bundled)
    ref_logits = bundled.model.prefill(0, torch.tensor(ids), 0)
    seq, logits = [], ref_logits
    for i in range(24):  # the float model's greedy text, fed to both (teacher forcing)
        t = int(logits.argmax())
        seq.append(t)
        logits = bundled.model.decode(torch.tensor([0]), torch.tensor([t]), torch.tensor([len(ids) + i]))[0]
    ref_all = bundled.model.prefill(0, torch.tensor(ids + seq), 0, all_logits=True)[len(ids) - 1:]
    got = [fast.model.prefill(1, torch.tensor(ids), 0)]
    for i, t in enumerate(seq):  # step by step through the decode kernel path
        got.append(fast.model.decode(torch.tensor([1]), torch.tensor([t]), torch.tensor([len(ids) + i]))[0])
    got_all = torch.stack(got)
    agree = (got_all.argmax(-1) == ref_all.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(got_all, ref_all, dim=-1).min().item()
    assert agree >= 0.9 and cos > 0.99, (agree, cos)


def test_converted_weights_cache(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tiny_dir / "cached.gguf", arch="llama", qtype="Q4_0")
    from safetensors.torch import save_file

    weights = tmp_path / "cache" / "weights"
    weights.mkdir(parents=True)
    stale = weights / ("0" * 32 + ".safetensors")  # what an earlier version of the layout left
    save_file({"x": torch.zeros(2)}, str(stale), metadata={"version": "1", "info": "{}"})
    foreign = weights / "notes.safetensors"
    foreign.write_bytes(b"not a safetensors file")
    someone_elses = weights / ("1" * 32 + ".safetensors")  # a model's own weights, in a cache dir set to a model folder
    save_file({"x": torch.zeros(2)}, str(someone_elses), metadata={"format": "pt"})
    first = load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=1, max_seq=64)
    second = load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=1, max_seq=64)
    assert not first.extra["cached"] and second.extra["cached"]
    assert (second.name, second.quantization, second.parameters) == (first.name, first.quantization, first.parameters)
    a = first.model.prefill(0, torch.tensor(TOKENS[:5]), 0)
    b = second.model.prefill(0, torch.tensor(TOKENS[:5]), 0)
    assert torch.equal(a, b)
    assert second.tokenizer.encode("Hello world") == first.tokenizer.encode("Hello world")
    assert not stale.exists() and foreign.exists() and someone_elses.exists()  # only our stale file goes
    foreign = {foreign, someone_elses}
    converted = set(weights.glob("*.safetensors")) - foreign
    assert len(converted) == 1
    path.touch()  # a changed file is converted again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=1, max_seq=64).extra["cached"]
    now = set(weights.glob("*.safetensors")) - foreign
    assert len(now) == 1 and now != converted  # the conversion it replaces is removed
    load_model(str(path), device="cpu", dtype="bfloat16", quant="int8", max_batch=1, max_seq=64)
    assert now < set(weights.glob("*.safetensors"))  # other settings of the same file: both kept


def test_chunked_prefill_equals_prefilling_each_chunk(tmp_path):
    """The scheduler's one-pass chunked prefill gives the numbers of chunk-by-chunk prefill calls,
    from a cold start and from a chunk-aligned cached prefix."""
    from influence_tui.engine.loader import load_model
    from influence_tui.library import bundled_gguf_path

    lm = load_model(str(bundled_gguf_path()), max_batch=2)
    m = lm.model
    m.prefer_dense_prefill(True)  # the path of CPUs with matrix units and of the torch fallback
    ids = torch.tensor(lm.tokenizer.encode("Rivers run to the sea and the sea gives rain back. " * 30)[:300])
    with torch.inference_mode():
        for begin in (0, 128):
            m.prefill(0, ids[begin : begin + 128], begin)
        # the partial last chunk: rows of the decode kernel where it runs, else one more dense piece
        ref = m.prefill_rows(0, ids[256:], 256) if m.rows_exact else m.prefill(0, ids[256:], 256)
        assert torch.equal(m.prefill_chunked(1, ids, 0, 128), ref)
        assert torch.equal(m.prefill_chunked(1, ids[128:], 128, 128), ref)
        assert torch.equal(m.kv_cache[3][0, :, :, :300], m.kv_cache[3][1, :, :, :300])


def test_prompts_run_as_rows_reuse_any_cached_prefix_exactly():
    """Where whole prompts run as kernel rows, a prompt continued from any cached position (not
    only a chunk boundary) leaves the numbers a cold start leaves."""
    from influence_tui.engine.loader import load_model
    from influence_tui.library import bundled_gguf_path

    lm = load_model(str(bundled_gguf_path()), max_batch=2)
    m = lm.model
    if not m.rows_only:
        pytest.skip("prompts run as dense chunks here (no C kernel, or a CPU with matrix units)")
    ids = torch.tensor(lm.tokenizer.encode("Rivers run to the sea and the sea gives rain back. " * 30)[:300])
    with torch.inference_mode():
        cold = m.prefill_chunked(0, ids, 0, 128)
        m.prefill_chunked(1, ids[:77], 0, 128)
        warm = m.prefill_chunked(1, ids[77:], 77, 128)
    assert torch.equal(cold, warm)
    assert torch.equal(m.kv_cache[3][0, :, :, :300], m.kv_cache[3][1, :, :, :300])


def test_prefill_many_equals_each_prompt_alone():
    """Prompts admitted together share each layer's dequantised weights and get the same numbers."""
    from influence_tui.engine.loader import load_model
    from influence_tui.library import bundled_gguf_path

    lm = load_model(str(bundled_gguf_path()), max_batch=6)
    m = lm.model
    a = torch.tensor(lm.tokenizer.encode("The moon rises over the quiet harbour. " * 20)[:200])  # a chunk + a tail
    b = torch.tensor(lm.tokenizer.encode("Write a poem about bread.")[:12])  # short: the int4 kernel path
    c = torch.tensor(lm.tokenizer.encode("Bread is baked at dawn in the old town. " * 30)[:256])  # two whole chunks
    with torch.inference_mode():
        alone = [m.prefill_chunked(0, a, 0, 128), m.prefill_chunked(1, b, 0, 128), m.prefill_chunked(2, c, 0, 128)]
        together = m.prefill_many([(3, a, 0), (4, b, 0), (5, c, 0)], 128)
    assert all(torch.equal(x, y) for x, y in zip(alone, together))


def test_thread_governor_keeps_full_threads_through_bursts_and_drops_under_contention():
    """Decode steps' thread count: a step or two slowed by a burst (the app redrawing) keep all
    threads; steps 10x slower in a row (another process on a core) drop to one within three steps;
    probes later return to all threads once they beat one thread again."""
    from influence_tui.engine.governor import ThreadGovernor

    gov = ThreadGovernor()

    def run(times: list[float]) -> list[int]:
        used = []
        for dt in times:
            used.append(gov.threads(2))
            gov.record(dt)
        return used

    assert run([0.005] * 20) == [2] * 20
    assert run([0.005, 0.012, 0.013, 0.005] * 10) == [2] * 40  # bursts of two 2.5x steps
    used = run([0.05] * 4)
    assert used[:3] == [2, 2, 2] and used[3] == 1  # contention: one thread from the fourth step
    used = run([0.03] * 7 + [0.005] * 5)  # one thread for the backoff (8 steps), then full threads' probe wins
    assert used[:7] == [1] * 7 and used[7:] == [2] * 5


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="Linux's madvise(MADV_HUGEPAGE)")
def test_read_huge_reads_all_but_the_skipped_ranges_and_stays_mapped_where_memory_is_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from influence_tui.engine import weights_cache

    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(1, 256)) * 300)
    monkeypatch.setattr(weights_cache, "_huge_pages_offered", lambda: True)
    monkeypatch.setattr(weights_cache, "_memory_available", lambda: 2 * f.stat().st_size - 1)
    assert weights_cache.read_huge(f) is None  # a private copy would crowd out the page cache
    monkeypatch.setattr(weights_cache, "_memory_available", lambda: 10**9)
    got = weights_cache.read_huge(f, skip=[(1000, 5000)])
    assert got is not None
    data, finish = got
    finish()
    raw = f.read_bytes()
    assert bytes(data[:1000]) == raw[:1000] and bytes(data[5000:]) == raw[5000:]
    assert not data[1000:5000].any()  # not read: zero pages, no memory


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_vocabulary_of_odd_size_loads_from_the_cache(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        quant: str) -> None:
    """33 extra tokens (a vocabulary of 417, as 32001 is): safetensors' writer then put tensors at
    addresses that are not multiples of 64, which crashed torch's int8 kernel (a segfault on the
    second load of such a model). The cache starts every tensor at a multiple of 64, and stays a
    file the safetensors library reads."""
    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tiny_dir / f"odd-{quant}.gguf", arch="llama", qtype="Q8_0", extra_tokens=33)
    first = load_model(str(path), device="cpu", dtype="bfloat16", quant=quant, max_batch=1, max_seq=64)
    second = load_model(str(path), device="cpu", dtype="bfloat16", quant=quant, max_batch=1, max_seq=64)
    assert second.extra["cached"] and second.model.vocab_size == 417
    for ids in (TOKENS[:1], TOKENS[:5]):  # one token (the int8/int4 kernels) and a few
        assert torch.equal(first.model.prefill(0, torch.tensor(ids), 0), second.model.prefill(0, torch.tensor(ids), 0))
    assert torch.equal(first.model.decode(torch.tensor([0]), torch.tensor([9]), torch.tensor([5])),
                       second.model.decode(torch.tensor([0]), torch.tensor([9]), torch.tensor([5])))
    from safetensors import safe_open

    from influence_tui.engine import weights_cache
    from influence_tui.engine.loader import read_safetensors_mmap

    (cached,) = (tmp_path / "cache" / "weights").glob("*.safetensors")
    entries, _ = weights_cache.read_header(cached)
    assert entries and all(start % 64 == 0 for _, _, start, _ in entries.values())
    ours, _ = read_safetensors_mmap(cached)
    with safe_open(str(cached), framework="pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(weights_cache.PAD)}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(t.data_ptr() % 64 == 0 for t in ours.values())
    assert len({t.untyped_storage().data_ptr() for t in ours.values()}) == 1  # all views of the mapping: no copy


def test_qwen3_head_norms_on_every_path(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3's per-head q/k norms run on the prefill, one-sequence decode and batched decode paths
    alike, and survive the converted-weights cache of a quantized GGUF."""
    folder = write_tiny_llama_safetensors(tiny_dir / "st-qwen3-paths", arch="qwen3", seed=2)  # float: the torch path
    m = load_model(str(folder), device="cpu", dtype="float32", quant="none", max_batch=3, max_seq=64).model
    full = m.prefill(0, torch.tensor(TOKENS[:10]), 0, all_logits=True)
    m.prefill(1, torch.tensor(TOKENS[:9]), 0)
    one = m.decode(torch.tensor([1]), torch.tensor([TOKENS[9]]), torch.tensor([9]))[0]
    assert torch.allclose(one, full[-1], atol=1e-4)
    m.prefill(1, torch.tensor(TOKENS[:9]), 0)
    m.prefill(2, torch.tensor(TOKENS[:4]), 0)
    both = m.decode(torch.tensor([1, 2]), torch.tensor([TOKENS[9], TOKENS[4]]), torch.tensor([9, 4]))
    assert torch.allclose(both[0], full[-1], atol=1e-4) and torch.allclose(both[1], full[4], atol=1e-4)

    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tiny_dir / "qwen3-q4.gguf", arch="qwen3", qtype="Q4_1")
    first = load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=1, max_seq=64)
    second = load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=1, max_seq=64)
    assert second.extra["cached"] and second.model.layers[0].q_norm is not None
    assert torch.equal(first.model.prefill(0, torch.tensor(TOKENS[:9]), 0), second.model.prefill(0, torch.tensor(TOKENS[:9]), 0))
