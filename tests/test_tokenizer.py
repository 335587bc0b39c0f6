"""Tokenizers (GGUF-built and tokenizer.json folders), chat templates and streaming detokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from influence_tui.engine.tokenizer import IncrementalDecoder, load_folder_tokenizer, load_gguf_tokenizer
from tests.tiny_models import write_tiny_llama_safetensors

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines",
    "Emoji 🎉🚀 and CJK 你好世界, こんにちは, 한국어",
    "def f(x):\n    return x ** 2  # café naïve",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour 🎨"},
]


@pytest.fixture(scope="module")
def bundled_tok(bundled_gguf: Path):
    return load_gguf_tokenizer(bundled_gguf)


@pytest.fixture(scope="module")
def hf_tok(bundled_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(bundled_gguf.parent, gguf_file=bundled_gguf.name)


def test_bundled_special_tokens(bundled_tok) -> None:
    assert bundled_tok.has_chat_template
    assert bundled_tok.decode([bundled_tok.bos_token_id]) == "<|im_start|>"
    assert bundled_tok.encode("<|im_end|>")[0] in bundled_tok.eos_token_ids


@pytest.mark.parametrize("text", TEXTS)
def test_bundled_round_trip_and_matches_transformers(bundled_tok, hf_tok, text: str) -> None:
    ids = bundled_tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert bundled_tok.decode(ids) == text


def test_bundled_chat_template_matches_transformers(bundled_tok, hf_tok) -> None:
    for msgs in (MESSAGES, MESSAGES[1:2]):
        for gen in (True, False):
            ours = bundled_tok.apply_chat_template(msgs, add_generation_prompt=gen)
            ref = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert ours == ref


def test_bad_role_is_a_value_error(bundled_tok) -> None:
    with pytest.raises(ValueError, match="robot"):
        bundled_tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_gguf_tokenizer_is_cached(bundled_gguf: Path, bundled_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    import influence_tui.engine.tokenizer as mod

    def boom(path):  # a second load must not rebuild (no transformers import)
        raise AssertionError("rebuilt")

    monkeypatch.setattr(mod, "build_gguf_tokenizer_json", boom)
    again = load_gguf_tokenizer(bundled_gguf)
    assert again.encode(TEXTS[2]) == bundled_tok.encode(TEXTS[2])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_equals_full_decode(bundled_tok, text: str) -> None:
    for skip in (False, True):
        dec = IncrementalDecoder(bundled_tok, skip_special_tokens=skip)
        pieces = [dec.push(t) for t in bundled_tok.encode(text)]
        pieces.append(dec.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoding_holds_back_split_characters(bundled_tok) -> None:
    ids = bundled_tok.encode("🎉")
    assert len(ids) > 1  # byte-level BPE splits the emoji over several tokens
    dec = IncrementalDecoder(bundled_tok)
    out = [dec.push(t) for t in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🎉"


def test_folder_tokenizer(tmp_path: Path) -> None:
    folder = write_tiny_llama_safetensors(tmp_path / "tiny")
    tok = load_folder_tokenizer(folder)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token_ids == {2}
    text = "Hello world, the quick brown fox!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template(MESSAGES[1:2]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(t) for t in tok.encode(text)) + dec.flush() == text


def test_no_torch_import() -> None:
    import subprocess
    import sys

    code = "import sys, influence_tui.engine.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
