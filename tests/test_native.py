"""The C decode kernel (engine/kernels/decode.c) against the torch path it replaces.

The torch path (`use_native(False)`) runs the same int4 weights through torch ops step by step;
the kernel must give the same greedy tokens, logits within bf16 rounding, and exactly the same
numbers for a sequence whether it decodes alone or batched with others.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from influence_tui.engine import native  # noqa: E402
from influence_tui.engine import quant as Q  # noqa: E402
from influence_tui.engine.loader import load_model  # noqa: E402
from tests.tiny_models import write_tiny_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not native.vectorized(), reason="the AVX-512 BF16 kernel is not available here")


def _rel_err(a: "torch.Tensor", b: "torch.Tensor") -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _greedy(model, slot: int, ids: list[int], steps: int) -> tuple[list[int], "torch.Tensor"]:
    logits = model.prefill(slot, torch.tensor(ids), 0)
    out, rows = [], []
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = model.decode(torch.tensor([slot]), torch.tensor([out[-1]]), torch.tensor([len(ids) + i]))[0]
        rows.append(logits)
    return out, torch.stack(rows)


def _assert_kernel_decodes_like_torch(model, ids: list[int], tolerance: float) -> None:
    """8 greedy steps in the kernel (slot 0) and on the torch path (slot 1): the same tokens, and
    logits within `tolerance` (relative: int8 activations)."""
    got, got_logits = _greedy(model, 0, ids, 8)
    model.use_native(False)
    try:
        ref, ref_logits = _greedy(model, 1, ids, 8)
    finally:
        model.use_native(True)
    assert got_logits.shape[-1] == model.vocab_size
    assert got == ref and _rel_err(got_logits, ref_logits) < tolerance


@pytest.fixture(scope="module")
def fast(bundled_gguf: Path):
    lm = load_model(str(bundled_gguf), device="cpu", max_batch=8, max_seq=512)
    assert lm.extra["weights"] == "int4" and lm.model.native
    return lm


def test_q4_layout_is_exact_and_kernel_matches_dense() -> None:
    torch.manual_seed(0)
    w, bias = torch.randn(192, 256), torch.randn(192)
    lin = Q.Q4Linear.from_float(w, bias, torch.bfloat16)
    q, scale, minimum = Q.quantize_int4(w)
    assert torch.equal(lin.unpacked(), q)  # the pair-interleaved packing loses nothing
    deq = (q.view(192, 8, 32).float() * scale.half().float()[..., None] + minimum.half().float()[..., None]).view(192, 256)
    assert torch.equal(lin.dense_weight(), deq.bfloat16())  # the C dequantiser: bf16(q * d + m)
    for tokens in (1, 3, 9, Q.DENSE_MIN_TOKENS + 1):  # kernel rows (in passes of 8) and the dense path
        x = torch.randn(tokens, 256).bfloat16()
        assert _rel_err(lin(x), x.float() @ deq.t() + bias) < 0.01


def test_q4_repacks_gguf_blocks_bit_for_bit(tmp_path: Path) -> None:
    from influence_tui.formats.gguf_tensors import GGUFTensors

    path = write_tiny_gguf(tmp_path / "q41.gguf", arch="llama", qtype="Q4_1")
    t = GGUFTensors(path)
    blocks = t.q4_blocks("blk.0.ffn_up.weight")
    assert blocks is not None
    lin = Q.Q4Linear.from_parts(blocks.q, blocks.scale, blocks.minimum, None, torch.bfloat16)
    assert torch.equal(lin.dequantize().float(), blocks.dequantize().bfloat16().float())


def _forced(model, slot: int, ids: list[int], seq: list[int]) -> "torch.Tensor":
    """Logits of each step when decoding the given tokens (teacher forcing): [len(seq), vocab]."""
    rows = [model.prefill(slot, torch.tensor(ids), 0)]
    for i, t in enumerate(seq[:-1]):
        rows.append(model.decode(torch.tensor([slot]), torch.tensor([t]), torch.tensor([len(ids) + i]))[0])
    return torch.stack(rows)


@pytest.mark.slow
def test_kernel_decodes_like_the_torch_path(fast) -> None:
    tok, model = fast.tokenizer, fast.model
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}]))
    got, _ = _greedy(model, 0, ids, 48)
    assert "sea" in tok.decode(got).lower() or "wave" in tok.decode(got).lower()
    kernel = _forced(model, 0, ids, got)
    try:
        assert not model.use_native(False)
        torch_path = _forced(model, 1, ids, got)
    finally:
        assert model.use_native(True)
    # the same text fed to both: the same choice at every step but near-ties (int8 activations,
    # bf16 sums in another order, attention weights as bf16 pairs), and logits within bf16
    # rounding of each other (the lowest cosine of the 48 steps: 0.993 here)
    same = kernel.argmax(-1) == torch_path.argmax(-1)
    top2 = torch_path.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    assert same.float().mean().item() >= 0.9
    assert (gap[~same] <= 0.25).all(), gap[~same]  # a different choice only where torch's logits (nearly) tie
    assert torch.nn.functional.cosine_similarity(kernel, torch_path, dim=-1).min().item() > 0.99
    assert (kernel - torch_path).abs().max().item() < 2.0


@pytest.mark.slow
def test_batched_steps_equal_each_sequence_alone(fast) -> None:
    tok, model = fast.tokenizer, fast.model
    prompts = [f"Name {i + 1} colours." for i in range(8)]
    idss = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    alone = [_greedy(model, i, ids, 12) for i, ids in enumerate(idss)]
    logits = [model.prefill(i, torch.tensor(ids), 0) for i, ids in enumerate(idss)]
    toks = [int(x.argmax()) for x in logits]
    order = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])  # slots in any order, not a contiguous run
    for step in range(12):
        out = model.decode(order, torch.tensor([toks[i] for i in order]),
                           torch.tensor([len(idss[i]) + step for i in order]))
        for row, i in enumerate(order.tolist()):
            assert torch.equal(out[row], alone[i][1][step]), (i, step)  # bit for bit
            toks[i] = int(out[row].argmax())


@pytest.mark.slow
def test_prompt_rows_compute_what_decode_steps_compute(fast) -> None:
    """A prompt's tail run as kernel rows leaves the cache and logits a token-by-token decode
    leaves: the reason the scheduler may reuse decoded positions and the tail as they are."""
    model = fast.model
    ids = torch.tensor(fast.tokenizer.encode("Rivers run to the sea and the sea gives rain back. " * 20)[:150])
    model.prefill_chunked(2, ids[:128], 0, 128)
    model.prefill_chunked(3, ids[:128], 0, 128)
    rows = model.prefill_rows(2, ids[128:], 128)
    for pos in range(128, 150):
        step = model.decode(torch.tensor([3]), ids[pos : pos + 1], torch.tensor([pos]))[0]
    assert torch.equal(rows, step)
    assert torch.equal(model.kv_cache[5][2, :, :, :150], model.kv_cache[5][3, :, :, :150])


def test_portable_build_agrees_with_the_vectorized_one(tmp_path: Path) -> None:
    """The plain-C fallback (what a CPU without AVX-512 BF16 would compile) computes the same."""
    lib = native.open_library(native.build(["-O2", "-march=x86-64-v2", "-fopenmp", "-shared", "-fPIC"], tmp_path))
    assert lib.influence_vectorized() == 0
    torch.manual_seed(1)
    lin = Q.Q4Linear.from_float(torch.randn(128, 192), torch.randn(128), torch.bfloat16)
    x = torch.randn(5, 192).bfloat16()
    y = torch.empty(5, 128, dtype=torch.bfloat16)
    assert lib.influence_q4_matmul(ctypes.byref(lin.struct()), x.data_ptr(), 5, y.data_ptr(), 1) == 0
    assert _rel_err(y, lin(x)) < 0.005


def test_tiny_model_runs_the_kernel_and_rejects_bad_positions(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="qwen2", qtype="Q4_0")  # qwen2: q/k/v biases
    lm = load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=2, max_seq=64)
    model = lm.model
    assert model.native
    ids = [5, 17, 42, 99, 3, 250]
    _assert_kernel_decodes_like_torch(model, ids, 0.02)
    with pytest.raises(ValueError, match="outside"):
        model.decode(torch.tensor([0]), torch.tensor([1]), torch.tensor([64]))
    with pytest.raises(ValueError, match="outside"):
        model.decode(torch.tensor([2]), torch.tensor([1]), torch.tensor([3]))


def test_a_vocabulary_not_in_blocks_of_16_rows(tmp_path: Path) -> None:
    """The kernel's lm_head runs 16 rows at a time: a vocabulary of 389 (the last block part
    padding) gives the choices and, within int8 activations' error, the logits of the torch path."""
    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="llama", qtype="Q4_1", extra_tokens=5)
    lm = load_model(str(path), device="cpu", dtype="bfloat16", quant="int4", max_batch=2, max_seq=64)
    model = lm.model
    assert model.native and model.vocab_size % 16 != 0
    ids = [5, 17, 42, 99, 3, 250]
    _assert_kernel_decodes_like_torch(model, ids, 0.03)
    lanes = native.head_lanes(model.lm_head.q.numpy())
    assert lanes.size == 400 * model.cfg.dim  # 25 blocks of 16 rows
    vectors = model.cfg.dim // 64
    row, col = 388, 64 * (vectors - 1) + 4 * 3 + 2  # block 24, lane 4; class 3, last vector, byte 2
    at = ((24 * 16 + 3) * vectors + vectors - 1) * 64 + 4 * 4 + 2
    assert int(lanes[at]) == int(model.lm_head.q[row, col]) + 128


_FALLBACK = """
import json, sys, torch
from influence_tui.engine.loader import load_model
from influence_tui.library import bundled_gguf_path
ids, seq = json.loads(sys.argv[1])
lm = load_model(str(bundled_gguf_path()), device="cpu", max_batch=1, max_seq=512)
assert not lm.model.native and lm.extra["weights"] == "int4"
rows = [lm.model.prefill(0, torch.tensor(ids), 0)]
for i, t in enumerate(seq[:-1]):
    rows.append(lm.model.decode(torch.tensor([0]), torch.tensor([t]), torch.tensor([len(ids) + i]))[0])
print(json.dumps([int(r.argmax()) for r in rows]))
"""


@pytest.mark.slow
def test_without_the_kernel_torch_int4_says_the_same(fast, tmp_path: Path) -> None:
    """INFLUENCE_NATIVE=0 (what a CPU without AVX-512 BF16 gets): torch's int4 kernel, its own
    weight layout, and the same choices as the C kernel on the same text."""
    import json
    import os
    import subprocess
    import sys

    tok, model = fast.tokenizer, fast.model
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}]))
    seq, _ = _greedy(model, 0, ids, 32)
    env = {**os.environ, "INFLUENCE_NATIVE": "0", "INFLUENCE_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _FALLBACK, json.dumps([ids, seq])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    picks = json.loads(done.stdout.strip().splitlines()[-1])
    agree = sum(a == b for a, b in zip(picks, seq)) / len(seq)
    assert agree >= 0.85, (agree, tok.decode(seq))


def test_attention_at_block_edges_and_the_end_of_the_cache(bundled_gguf: Path) -> None:
    """The kernel's attention takes positions 16 at a time (K transposed) and 2 at a time (V
    interleaved): prompts of 1, 16, 17, 33 and 45 tokens and decode steps up to the last position
    of a 50-position cache (not a multiple of 16 or 32) agree bit for bit between a prompt's rows
    and token-by-token steps, and with the torch path within bf16 rounding."""
    lm = load_model(str(bundled_gguf), device="cpu", max_batch=3, max_seq=50)
    model = lm.model
    ids = lm.tokenizer.encode("Rivers run to the sea and the sea gives rain back to the hills. " * 6)[:50]
    steps = [model.decode(torch.tensor([1]), torch.tensor([t]), torch.tensor([i]))[0] for i, t in enumerate(ids[:45])]
    for n in (1, 16, 17, 33, 45):
        assert torch.equal(model.prefill_rows(0, torch.tensor(ids[:n]), 0), steps[n - 1]), n
    assert torch.equal(model.kv_cache[7][0, :, :, :45], model.kv_cache[7][1, :, :, :45])
    for i in range(45, 50):  # both slots together to the cache's last position
        both = model.decode(torch.tensor([0, 1]), torch.tensor([ids[i]] * 2), torch.tensor([i, i]))
        assert torch.equal(both[0], both[1])
    try:
        assert not model.use_native(False)
        model.prefill(2, torch.tensor(ids[:45]), 0)
        for i in range(45, 50):
            ref = model.decode(torch.tensor([2]), torch.tensor([ids[i]]), torch.tensor([i]))[0]
    finally:
        assert model.use_native(True)
    assert torch.nn.functional.cosine_similarity(both[0], ref, dim=0).item() > 0.99
    with pytest.raises(ValueError, match="outside"):
        model.decode(torch.tensor([0]), torch.tensor([ids[0]]), torch.tensor([50]))


def test_the_kernel_samples_what_numpy_samples(tmp_path: Path) -> None:
    """The C sampler (one call a token) against the numpy one, vectorized and plain-C builds: on
    flat to peaked vocabularies of 49k, with top-k, top-p, min-p and penalties, every C pick is one
    of the tokens numpy keeps, and at the same random number it is the same token (but for float
    rounding at the edge of a token's share); a NaN or an all -inf row leaves the pick to the caller."""
    import numpy as np

    from influence_tui.engine import sampling as S
    from influence_tui.params import GenerationParams

    portable = native.open_library(native.build(["-O2", "-march=x86-64-v2", "-fopenmp", "-shared", "-fPIC"], tmp_path))
    rng = np.random.default_rng(7)
    settings = [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=1.0), dict(temperature=0.8, top_k=40, top_p=0.95),
                dict(temperature=1.2, top_p=0.5, min_p=0.05), dict(temperature=0.7, top_k=3, top_p=1.0)]
    history = list(range(50, 120))
    for lib in (native.library(), portable):
        for spread in (0.5, 3.0, 8.0):
            x = (rng.standard_normal(49152) * spread).astype(np.float32)
            for kw in settings:
                p = GenerationParams(repeat_penalty=1.3, presence_penalty=0.2, **kw)
                penalised = x.copy()
                S._penalise(penalised, p, history, {})
                kept = S._candidates(penalised, p)
                assert kept is not None
                probs, ids = kept
                overrides = S._penalties(x, p, history, {})
                same, us = 0, rng.random(100)
                for u in us:
                    token = native.sample(x, overrides, p.temperature, p.top_k or 0, p.top_p, p.min_p, float(u), lib)
                    assert token in set(ids.tolist()), (spread, kw)
                    same += token == int(ids[S.draw(probs, float(u))])
                assert same >= 97, (spread, kw, same)
        nan = np.zeros(100, dtype=np.float32)
        nan[5] = np.nan
        assert native.sample(nan, {}, 0.7, 0, 0.9, 0.0, 0.5, lib) is None
        assert native.sample(np.full(100, -np.inf, dtype=np.float32), {}, 0.7, 0, 0.9, 0.0, 0.5, lib) is None
        half = np.zeros(1000, dtype=np.float32)
        half[::2] = -np.inf
        picks = {native.sample(half, {}, 1.0, 0, 1.0, 0.0, float(u), lib) for u in rng.random(300)}
        assert picks and all(i % 2 == 1 for i in picks)


def test_qwen3_head_norms_run_in_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3 (per-head q/k norms, heads wider than dim / heads): the kernel decodes what the torch
    path decodes, and the torch-free model computes the same bits as the torch model's kernel."""
    from influence_tui.engine.native_model import KernelLlama, load_native

    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "qwen3.gguf", arch="qwen3", qtype="Q4_1")
    lm = load_model(str(path), device="cpu", max_batch=2, max_seq=64)  # the defaults: what load_native reads
    model = lm.model
    assert model.native and model.cfg.qk_norm and model.cfg.head_dim * model.cfg.n_heads != model.cfg.dim
    ids = [5, 17, 42, 99, 3, 250]
    _assert_kernel_decodes_like_torch(model, ids, 0.02)
    kernel_lm = load_native(str(path), max_batch=2, max_seq=64)
    assert kernel_lm is not None and isinstance(kernel_lm.model, KernelLlama)
    assert np.array_equal(kernel_lm.model.prefill(0, ids, 0), model.prefill_chunked(0, torch.tensor(ids), 0, 128).numpy())
