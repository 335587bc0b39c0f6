"""JSON mode: the recognizer on its own, then answers of the real model that parse as JSON objects."""

import json

import pytest

from influence_tui.engine.constrain import MAX_WHITESPACE, JsonPrefix

VALID = [
    '{}', '{"a": 1}', '{"a": [1, 2.5, -3e+2, 0, -0.5E-3], "b": {"c": null, "d": true, "e": false}}',
    '{"s": "quote \\" slash \\\\ unicode \\u00e9 tab \\t", "k": []}', ' \n{ "nested" : [ [ ] , { } ] } \n',
    '{"emoji": "☕ ünïcode"}',
]
INVALID_PREFIXES = [
    '[1]', '"x"', '1', 'x', '{a', "{'a'", '{"a" 1', '{"a":}', '{"a": 01', '{"a": 1.}', '{"a": -}', '{"a": 1,}',
    '{"a": tru}', '{"a": trux', '{"a": [1 2]}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": "line\nbreak"}',
    '{"a": 1]', '{"a": [1}', '{} {}', '{}x', '{"a": 1e}', '{"a": +1}',
]


def feeds(text: str) -> JsonPrefix | None:
    state = JsonPrefix()
    return state if state.feed(text) else None


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_are_accepted_whole_and_complete(text):
    json.loads(text)
    state = feeds(text)
    assert state is not None and state.complete
    # and every prefix, fed in pieces of any size, is a valid prefix
    for cut in range(len(text)):
        state = JsonPrefix()
        assert state.feed(text[:cut]) and state.feed(text[cut:]) and state.complete


@pytest.mark.parametrize("text", INVALID_PREFIXES)
def test_what_no_json_object_starts_with_is_refused(text):
    state = feeds(text)
    # refused, or (for an unfinished number such as '1.') not complete and refused at the next character
    assert state is None or (not state.complete and not state.copy().feed("}"))


def test_prefixes_are_not_complete_and_copies_are_independent():
    state = feeds('{"a": [1, {"b": "x')
    assert state is not None and not state.complete
    trial = state.copy()
    assert trial.feed('"}]}') and trial.complete
    assert not state.complete and state.feed('y"}]}') and state.complete


def test_whitespace_runs_are_capped():
    assert feeds("{" + " " * MAX_WHITESPACE + "}")
    assert feeds("{" + " " * (MAX_WHITESPACE + 1)) is None


# -- the sampler on small vocabularies ------------------------------------------------------------


def _wordlevel(vocab: dict[str, int], sentencepiece: bool):
    from tokenizers import Tokenizer, decoders, models

    from influence_tui.engine.tokenizer import HFTokenizer

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "</s>"])
    if sentencepiece:  # what transformers builds for Llama/Mistral GGUFs: the first token's space is stripped
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return HFTokenizer(tok=tok, eos_token="</s>", eos_token_ids={1})


def _run(sampler, vocab_size: int, favourites: list[list[int]], tokenizer) -> str:
    """Feed logits that rank `favourites[i]` first to last at step i; the decoded text."""
    import numpy as np

    from influence_tui.engine.tokenizer import IncrementalDecoder

    decoder, history, out = IncrementalDecoder(tokenizer, skip_special_tokens=True), [], ""
    for ranked in favourites:
        logits = np.full(vocab_size, -9.0, dtype=np.float32)
        for rank, token in enumerate(ranked):
            logits[token] = 5.0 - rank
        token = sampler(logits, history)
        history.append(token)
        out += decoder.push(token)
    return out + decoder.flush()


def test_a_sentencepiece_token_is_checked_with_the_space_it_prints():
    """"▁rue" prints " rue" inside a text (alone it decodes to "rue"): after `t` it would make
    `t rue`, so the next best token that fits is taken."""
    from influence_tui.engine.constrain import JsonSampler, vocabulary
    from influence_tui.engine.sampling import Sampler
    from influence_tui.params import GenerationParams

    vocab = {"<unk>": 0, "</s>": 1, "{": 2, '"': 3, "a": 4, ":": 5, "t": 6, "rue": 7, "▁rue": 8, "}": 9}
    tok = _wordlevel(vocab, sentencepiece=True)
    sampler = JsonSampler(Sampler(GenerationParams(temperature=0.0)), vocabulary(tok), {1})
    text = _run(sampler, len(vocab), [[2], [3], [4], [3], [5], [6], [8, 7], [9]], tok)
    assert text == '{"a":true}' and sampler.complete


def test_greedy_json_takes_the_best_token_after_penalties():
    from influence_tui.engine.constrain import JsonSampler, vocabulary
    from influence_tui.engine.sampling import Sampler
    from influence_tui.params import GenerationParams

    vocab = {"<unk>": 0, "</s>": 1, "{": 2, '"': 3, "a": 4, "b": 5, ":": 6, "1": 7, "}": 8}
    tok = _wordlevel(vocab, sentencepiece=False)
    params = GenerationParams(temperature=0.0, repeat_penalty=10.0)
    sampler = JsonSampler(Sampler(params), vocabulary(tok), {1})
    # after `{"a` the model prefers `a` again, but it is penalised (it is in the history): `b` wins
    text = _run(sampler, len(vocab), [[2], [3], [4], [4, 5], [3], [6], [7], [8]], tok)
    assert text.replace(" ", "") == '{"ab":1}' and is_json_object(text)  # (this vocabulary decodes with spaces)


# -- the real model -------------------------------------------------------------------------------


# `engine`: the bundled model, from conftest.py


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_model_answers_with_a_json_object(engine, temperature):
    from influence_tui.engine import ChatMessage, GenerationRequest
    from influence_tui.params import GenerationParams

    params = GenerationParams(temperature=temperature, max_tokens=300, seed=3)
    for question in ("Give me a JSON object describing a cat with name and age.",
                     "Return a JSON object with keys name and city for a person.", "What is 2+2? Answer in JSON."):
        result = engine.generate(GenerationRequest(messages=[ChatMessage("user", question)], params=params, format="json"))
        assert result.finish_reason == "stop", result.text  # it ended because the object closed
        assert isinstance(json.loads(result.text), dict), result.text
        # without JSON mode the same request is not a JSON object (the model chats)
        plain = engine.generate(GenerationRequest(messages=[ChatMessage("user", question)], params=params))
        assert not is_json_object(plain.text), plain.text


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_json_mode_batched_with_a_plain_request_leaves_the_plain_one_unchanged(engine):
    from influence_tui.engine import GenerationRequest
    from influence_tui.params import GenerationParams

    params = GenerationParams(temperature=0, max_tokens=40, repeat_penalty=1.0)
    alone = engine.generate(GenerationRequest(prompt="Tell me about the sea.", params=params)).text
    streams = engine.submit_many([GenerationRequest(prompt="Tell me about the sea.", params=params),
                                  GenerationRequest(prompt="Return a JSON object with keys name and city for a person.", params=GenerationParams(temperature=0, max_tokens=300),
                                                    format="json")])
    together, constrained = (s.wait(timeout=120) for s in streams)
    assert together.text == alone
    assert constrained.finish_reason == "stop" and is_json_object(constrained.text), constrained.text


def test_generate_and_batch_format_json_from_the_command_line(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, timeout=180)

    out = cli("generate", "Return a JSON object with keys name and city for a person.", "--format", "json", "--temperature", "0", "--max-tokens", "300")
    assert out.returncode == 0, out.stderr
    assert is_json_object(out.stdout), out.stdout
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "Return a JSON object with keys name and city for a person.", "format": "json", "temperature": 0, "max_tokens": 300}) + "\n"
                     + json.dumps({"prompt": "Hi", "format": "yaml"}) + "\n")
    out = cli("--batch", str(batch))
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert is_json_object(rows[0]["text"]) and "format must be" in rows[1]["error"]
