"""The kernel's torch-free model (engine/native_model.py): the same numbers as the torch model on
the same kernel, an engine that never imports torch, and the torch loader wherever it does not apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from influence_tui.engine import native  # noqa: E402
from influence_tui.engine.loader import load_model  # noqa: E402
from influence_tui.engine.native_model import KernelLlama, load_native  # noqa: E402

pytestmark = pytest.mark.skipif(not native.vectorized() or native.has_matrix_units(),
                                reason="the torch-free model needs the AVX-512 kernel (and no AMX)")


@pytest.fixture(scope="module")
def both(bundled_gguf: Path):
    """The torch model (its first load writes the converted weights) and the kernel's own model."""
    torch_lm = load_model(str(bundled_gguf), device="cpu", max_batch=3, max_seq=256)
    kernel_lm = load_native(str(bundled_gguf), max_batch=3, max_seq=256)
    assert kernel_lm is not None and isinstance(kernel_lm.model, KernelLlama)
    assert kernel_lm.extra["torch"] is False and kernel_lm.model.max_seq == torch_lm.model.max_seq == 256
    return torch_lm, kernel_lm


def test_same_logits_as_the_torch_model_bit_for_bit(both) -> None:
    torch_lm, kernel_lm = both
    a, b = torch_lm.model, kernel_lm.model
    ids = kernel_lm.tokenizer.encode("Rivers run to the sea and the sea gives rain back to the hills. " * 3)
    got = b.prefill(0, ids, 0)
    want = a.prefill_chunked(0, torch.tensor(ids), 0, 128).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(b.prefill(1, ids[:5], 0), a.prefill_chunked(1, torch.tensor(ids[:5]), 0, 128).numpy())
    for i in range(6):  # two slots batched, at different positions
        tok = int(got.argmax())
        rows = b.decode([0, 1], [tok, tok], [len(ids) + i, 5 + i])
        assert np.array_equal(rows, a.decode([0, 1], [tok, tok], [len(ids) + i, 5 + i]).numpy())
        got = rows[0]
    # the caches hold the same bits, and a copied prefix continues as the original does
    assert np.array_equal(b.kv_cache[3][0], a.kv_cache[3][0].view(torch.uint16).numpy())
    b.copy_positions(0, 2, len(ids))
    assert np.array_equal(b.decode([2], [7], [len(ids)]), b.decode([0], [7], [len(ids)]))


def test_weights_read_into_huge_pages_are_the_files_weights(both, bundled_gguf: Path, monkeypatch) -> None:
    """The weights copied into 2 MiB pages (where Linux offers them) answer as the file's mapping does."""
    from influence_tui.engine import weights_cache

    _, kernel_lm = both
    monkeypatch.setattr(weights_cache, "_huge_pages_offered", lambda: False)
    mapped = load_native(str(bundled_gguf), max_batch=1, max_seq=64)
    assert mapped is not None
    ids = kernel_lm.tokenizer.encode("The lighthouse keeper climbed the stairs.")
    assert np.array_equal(mapped.model.prefill(0, ids, 0), kernel_lm.model.prefill(0, ids, 0))
    assert mapped.model.decode([0], [ids[-1]], [len(ids)]).shape == (1, kernel_lm.model.vocab_size)


def test_the_first_kernel_call_waits_for_the_weights_and_reports_a_failed_read(both) -> None:
    _, kernel_lm = both
    m = kernel_lm.model
    calls = []
    waited = KernelLlama(m.cfg, m._keep, m._lib, m._keep, lambda: calls.append(1))
    waited.allocate(1, 16)
    assert calls == []  # building and allocating read only the mapped norms
    waited.prefill(0, [1, 2], 0)
    waited.decode([0], [3], [2])
    assert calls == [1]

    def short_file() -> None:
        raise OSError("the file is shorter than its size")

    broken = KernelLlama(m.cfg, m._keep, m._lib, m._keep, short_file)
    broken.allocate(1, 16)
    with pytest.raises(RuntimeError, match="could not be read: the file is shorter"):
        broken.prefill(0, [1, 2], 0)


def test_the_portable_build_computes_the_same_bits_at_the_first_position(both, tmp_path: Path) -> None:
    """The plain-C layers and lm_head (a CPU without AVX-512 BF16 compiles them) sum in the order
    the vector paths do: a first token, whose attention is its own value, gives the same logits.
    (Later positions differ in the last bits: the plain attention sums in another order.)"""
    _, kernel_lm = both
    m = kernel_lm.model
    fast = m._kernel().lib
    portable = native.open_library(native.build(["-O2", "-march=x86-64-v2", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"], tmp_path))
    assert portable.influence_vectorized() == 0
    try:
        got = []
        for lib in (fast, portable):
            m._step.lib = lib
            got.append(m.decode([1, 2], [17, 4000], [0, 0]))  # two sequences batched
    finally:
        m._step.lib = fast
    assert np.array_equal(got[0], got[1])


def test_a_prompt_longer_than_one_pass_computes_what_shorter_calls_compute(bundled_gguf: Path, both) -> None:
    """Rows go through the layers 512 at a time (a long prompt's activations are held one pass at a
    time): a 700-row call leaves the logits and cache of two calls that split it elsewhere, and
    logit rows asked for in any order, across passes, come back in that order."""
    lm = load_native(str(bundled_gguf), max_batch=2, max_seq=1024)
    m = lm.model
    ids = lm.tokenizer.encode("Rivers run to the sea and the sea gives rain back to the hills. " * 60)[:700]
    assert len(ids) == 700
    whole = m.step_rows([0] * 700, ids, list(range(700)), [699, 3, 520, 511, 512, 300])
    first = m.step_rows([1] * 300, ids[:300], list(range(300)), [3])
    second = m.step_rows([1] * 400, ids[300:], list(range(300, 700)), [399, 220, 211, 212, 0])
    assert np.array_equal(whole, np.concatenate([second[:1], first, second[1:]]))
    for layer in (0, 29):
        assert np.array_equal(m.kv_cache[layer][0, :, :, :700], m.kv_cache[layer][1, :, :, :700])
    assert np.array_equal(m.prefill(0, ids, 0), whole[0])  # the last row only: the in-order path


def test_bad_positions_and_slots_are_value_errors(both) -> None:
    _, kernel_lm = both
    m = kernel_lm.model
    with pytest.raises(ValueError, match="outside"):
        m.decode([0], [1], [256])
    with pytest.raises(ValueError, match="outside"):
        m.decode([3], [1], [0])
    with pytest.raises(ValueError, match="do not fit"):
        m.prefill(0, [1, 2, 3], 254)
    with pytest.raises(ValueError, match="cannot copy"):
        m.copy_positions(0, 5, 3)


def test_the_torch_loader_keeps_what_the_kernel_model_does_not_take(bundled_gguf: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(bundled_gguf)
    assert load_native(path, device="cuda") is None  # a GPU: torch's model
    assert load_native(path, quant="int8") is None  # other weight formats: torch's kernels
    assert load_native(path, dtype="float32") is None
    monkeypatch.setenv("INFLUENCE_NATIVE", "0")
    assert load_native(path) is None
    monkeypatch.delenv("INFLUENCE_NATIVE")
    # an entry the kernel declines is declined before its weights are read into memory
    from influence_tui.engine import weights_cache

    reads: list[str] = []
    real_read = weights_cache.read_huge
    monkeypatch.setattr(weights_cache, "read_huge", lambda *a: reads.append("read") or real_read(*a))
    with monkeypatch.context() as m:
        m.setattr(KernelLlama, "usable", classmethod(lambda cls, t, cfg: False))
        assert load_native(path) is None and reads == []
    assert load_native(path) is not None and reads == ["read"]
    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert load_native(path) is None  # not converted yet: the torch loader converts and writes the cache


_ENGINE = """
import json, sys
from influence_tui.config import Settings
from influence_tui.engine import ChatMessage, Engine, GenerationRequest
from influence_tui.params import GenerationParams
engine = Engine(Settings.load(env={}, use_file=False), max_batch=2)
summary = engine.load()
msgs = [ChatMessage("user", "Name three rivers in Europe.")]
greedy = engine.generate(GenerationRequest(messages=msgs, params=GenerationParams(temperature=0, repeat_penalty=1.0, max_tokens=24)))
sampled = engine.generate(GenerationRequest(messages=msgs, params=GenerationParams(seed=7, max_tokens=24)))
engine.shutdown()
print(json.dumps({"torch": "torch" in sys.modules, "greedy": greedy.text, "sampled": sampled.text,
                  "tokens": greedy.usage.completion_tokens, "device": summary.device, "weights": summary.weights}))
"""


def _engine_run(cache: Path) -> dict:
    env = {**os.environ, "INFLUENCE_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", _ENGINE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_engine_runs_without_torch_once_the_weights_are_converted(bundled_gguf: Path, tmp_path: Path, both) -> None:
    """A fresh cache: the first process converts with torch; the next never imports it, and
    answers as the torch model on the same kernel does (greedy, and sampled with a seed)."""
    first = _engine_run(tmp_path / "cache")
    second = _engine_run(tmp_path / "cache")
    assert first["torch"] is True and second["torch"] is False
    assert second["device"] == "cpu" and second["weights"] == "int4" and second["tokens"] == 24
    assert second["greedy"] == first["greedy"] and second["sampled"] == first["sampled"]
    # and what the model says, token by token, for the same chat prompt
    torch_lm, _ = both
    tok, m = torch_lm.tokenizer, torch_lm.model
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}]))
    logits, out = m.prefill_chunked(0, torch.tensor(ids), 0, 128), []
    for i in range(24):
        out.append(int(logits.argmax()))
        logits = m.decode([0], [out[-1]], [len(ids) + i])[0]
    assert second["greedy"] == tok.decode(out)
