"""Weight-only quantised linears and GGUF block decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from influence_tui.engine import quant as Q  # noqa: E402
from influence_tui.formats.gguf_tensors import GGUFTensors  # noqa: E402


def _rel_err(a: "torch.Tensor", b: "torch.Tensor") -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def weight() -> "torch.Tensor":
    torch.manual_seed(0)
    return torch.randn(192, 256)


def test_int4_kernel_and_dense_paths_agree(weight) -> None:
    lin = Q.Int4Linear.from_float(weight, None, torch.bfloat16)
    deq = lin.dequantize().float()
    assert _rel_err(deq, weight) < 0.1  # 4-bit group-32 error on Gaussian weights is ~8%
    q, scale, minimum = Q.quantize_int4(weight)  # the unpack undoes the kernel's packing exactly
    assert torch.equal(lin.unpacked(), q)
    for tokens in (1, 3, Q.DENSE_MIN_TOKENS + 1):
        x = torch.randn(tokens, 256).bfloat16()
        assert _rel_err(lin(x), x.float() @ deq.t()) < 0.01


def test_int8_linear(weight) -> None:
    bias = torch.randn(192)
    lin = Q.Int8Linear.from_float(weight, bias, torch.bfloat16)
    assert _rel_err(lin.dequantize(), weight) < 0.01
    for tokens in (1, 40):
        x = torch.randn(tokens, 256).bfloat16()
        assert _rel_err(lin(x), x.float() @ weight.t() + bias) < 0.02
    ids = torch.tensor([0, 5, 191])
    assert _rel_err(lin.rows(ids), weight[ids]) < 0.01


def test_make_linear_falls_back_to_int8_for_odd_shapes() -> None:
    int4 = Q.Q4Linear if Q.native_int4(torch.bfloat16) else Q.Int4Linear
    assert isinstance(Q.make_linear(torch.randn(100, 48), None, "int4", torch.bfloat16), Q.Int8Linear)
    assert isinstance(Q.make_linear(torch.randn(128, 64), None, "int4", torch.bfloat16), int4)
    assert isinstance(Q.make_linear(torch.randn(128, 64), None, "int4", torch.float32), Q.Int4Linear)
    assert isinstance(Q.make_linear(torch.randn(128, 64), None, "none", torch.float32), Q.FloatLinear)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "Q6_K"])
def test_gguf_blocks_decode_like_gguf_package(tmp_path: Path, qtype: str) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    gq = GGMLQuantizationType[qtype]
    if qtype == "Q6_K":  # no numpy quantiser for K-quants: random blocks with a sane f16 scale
        raw = rng.integers(0, 256, size=(128, 256 // 256 * 210), dtype=np.uint8)
        raw[:, 208:210] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    else:
        raw = w.astype(np.float16) if qtype == "F16" else quantize(w, gq)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    if qtype == "F16":
        writer.add_tensor("w", raw)
    else:
        writer.add_tensor("w", raw, raw_dtype=gq)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = GGUFTensors(path)
    assert t.shape("w") == (128, 256) and t.type_name("w") == qtype
    expected = raw.astype(np.float32) if qtype == "F16" else dequantize(raw, gq)
    got = t.dequantize("w").numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    blocks = t.q4_blocks("w")
    if qtype in ("Q4_0", "Q4_1"):  # the nibbles map onto the int4 kernel without re-quantising
        assert blocks is not None
        lin = Q.Int4Linear.from_parts(blocks.q, blocks.scale, blocks.minimum + 8 * blocks.scale, None, torch.float32)
        np.testing.assert_allclose(lin.dequantize().numpy(), expected, rtol=0, atol=1e-5)
    else:
        assert blocks is None


def test_int4_rows_match_dequantized(weight) -> None:
    lin = Q.Int4Linear.from_float(weight, None, torch.float32)
    ids = torch.tensor([0, 31, 32, 63, 64, 100, 191])
    assert torch.allclose(lin.rows(ids), lin.dequantize()[ids], atol=1e-6)
