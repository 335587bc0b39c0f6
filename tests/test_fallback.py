"""Architectures outside the fast model file run through transformers, behind the same engine."""

import json

import pytest
import torch

from influence_tui.config import Settings
from influence_tui.engine import Engine, GenerationRequest
from influence_tui.params import GenerationParams
from tests.tiny_models import CHATML, tiny_tokenizer


def write_tiny_phi3(folder):
    import transformers

    tok = tiny_tokenizer()
    cfg = transformers.Phi3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return model, tok


def test_phi3_runs_through_the_fallback_and_matches_transformers(tmp_path):
    folder = tmp_path / "org_tiny-phi3"
    folder.mkdir()
    model, tok = write_tiny_phi3(folder)
    engine = Engine(Settings.load(env={"INFLUENCE_WARMUP_TOKENS": "0"}, use_file=False), max_batch=2)
    try:
        summary = engine.load(str(folder))
        assert summary.architecture == "phi3" and summary.weights == "transformers"
        params = GenerationParams(temperature=0, max_tokens=12, repeat_penalty=1.0, ignore_eos=True)
        result = engine.generate(GenerationRequest(prompt="Hello world", raw=True, params=params))
        ids = tok.encode("Hello world").ids
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        assert result.usage.completion_tokens == 12
        assert result.text == tok.decode(expected)
    finally:
        engine.shutdown()


def test_unknown_architecture_is_named(tmp_path):
    folder = tmp_path / "org_weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "frobnicator", "architectures": ["FrobForCausalLM"]}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(tiny_tokenizer().to_str())
    engine = Engine(Settings.load(env={}, use_file=False))
    try:
        with pytest.raises(Exception, match="frobnicator"):
            engine.load(str(folder))
    finally:
        engine.shutdown()
