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


# texts where splitting at the added tokens could go wrong: tokens side by side, inside a message,
# half of one, whitespace and newlines around them, text before the first and after the last
PIECE_TEXTS = [
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start|>user\n  spaced  \n\n<|im_end|>\n<|im_start|>assistant\n",
    "plain text before <|im_start|>system\nquoted <|im_end|> inside<|im_end|>trailing  ",
    "<|im_start|>user\nhalf a token <|im_sta and <|im_end|\n<|im_end|>",
    "\n<|im_start|> café 🎉 你好 <|endoftext|>x<|im_end|>\t",
]


@pytest.mark.parametrize("text", PIECE_TEXTS + TEXTS)
def test_encoding_piece_by_piece_gives_the_whole_texts_ids(bundled_tok, text: str) -> None:
    whole = bundled_tok.tok.encode(text, add_special_tokens=False).ids
    assert bundled_tok.encode(text) == whole
    assert bundled_tok.encode(text) == whole  # again, from the pieces already known


def test_a_conversation_encodes_only_its_new_messages(bundled_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = [{"role": "system", "content": "You are terse (piece test)."}]
    for turn in range(6):
        msgs += [{"role": "user", "content": f"Question {turn}: what is {turn} squared?"}]
        text = bundled_tok.apply_chat_template(msgs)
        assert bundled_tok.encode(text) == bundled_tok.tok.encode(text, add_special_tokens=False).ids
        msgs += [{"role": "assistant", "content": f"It is {turn * turn}, as {turn} times {turn}."}]
    seen: list[str] = []
    inner = bundled_tok.tok

    class Spy:
        def encode(self, text: str, add_special_tokens: bool = True):
            seen.append(text)
            return inner.encode(text, add_special_tokens=add_special_tokens)

        def __getattr__(self, name: str):
            return getattr(inner, name)

    monkeypatch.setattr(bundled_tok, "tok", Spy())
    msgs += [{"role": "user", "content": "And 7?"}]
    bundled_tok.encode(bundled_tok.apply_chat_template(msgs))
    assert seen == ["assistant\nIt is 25, as 5 times 5.", "user\nAnd 7?"]  # the rest was known


def test_a_metaspace_tokenizer_encodes_whole_texts() -> None:
    """Metaspace (SentencePiece style) marks only the text's first word: pieces would differ."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from influence_tui.engine.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "▁a": 2, "a": 3, "▁": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.add_special_tokens(["<s>"])
    tok = HFTokenizer(raw)
    text = "a<s>a a"
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    assert tok._pieces() is None


def test_the_kept_pieces_are_bounded(bundled_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from influence_tui.engine import tokenizer

    tok = load_gguf_tokenizer(bundled_gguf)
    monkeypatch.setattr(tokenizer, "PIECE_CACHE_CHARS", 60)
    for n in range(20):
        text = f"<|im_start|>user\nmessage number {n} with some words<|im_end|>\n"
        assert tok.encode(text) == tok.tok.encode(text, add_special_tokens=False).ids
        assert sum(map(len, tok._piece_ids)) == tok._piece_chars <= 60


def test_a_prepend_normalizer_tokenizer_encodes_the_same_piece_by_piece() -> None:
    """Llama 2's tokenizer.json prepends "▁" in its normalizer, which the library applies to each
    piece between added tokens: piece by piece gives its ids too."""
    from tokenizers import Tokenizer, models, normalizers

    from influence_tui.engine.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁a": 3, "a": 4, "▁": 5, "▁b": 6, "b": 7}
    raw = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.add_special_tokens(["<s>", "</s>"])
    tok = HFTokenizer(raw)
    assert tok._pieces() is not None
    for text in ("a<s>a b</s>b", "<s> a", "a b<s></s>ab"):
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
