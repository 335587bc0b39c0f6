"""Tiny random Llama-family models written to disk, for fast format and engine tests.

    write_tiny_llama_safetensors(dir, arch="llama" | "mistral" | "qwen2" | "qwen3", seed=0) -> folder Path
    write_tiny_gguf(path, arch="llama" | "qwen2" | "qwen3", qtype="F32" | "F16" | "Q8_0" | "Q4_0" | "Q4_1") -> file Path

Both come with a small byte-level BPE tokenizer (trained here on a few sentences) with ChatML
special tokens and a ChatML chat template. Dimensions are multiples of 64 so the int4 kernel
applies. The GGUF is written the way llama.cpp's converter does (tensor names, q/k permutation
for llama), so transformers can read it back with `gguf_file=`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def main():\n    print('hello')\n",
    "Numbers 0123456789 and symbols #$%&*()[]{}",
]
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) of ~400 tokens, specials at ids 0..2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _hf_model(arch: str, vocab: int, seed: int, context: int = DIMS["max_position_embeddings"]):
    import torch
    import transformers

    cls_cfg, cls_model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[arch]
    extra = {"sliding_window": None} if arch in ("mistral", "qwen2", "qwen3") else {}
    if arch == "qwen3":  # heads wider than hidden_size / heads, as Qwen3-0.6B's (128 x 16 > 1024)
        extra["head_dim"] = 32
    cfg = getattr(transformers, cls_cfg)(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rope_theta=10000.0, **{**DIMS, "max_position_embeddings": context}, **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, cls_model)(cfg).eval()
    with torch.no_grad():  # random init is tiny (std 0.02): widen it so logits are not all ~0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if p.dim() > 1 else 0.05)
    return model


def write_tiny_llama_safetensors(dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    return _save(folder, _hf_model(arch, tok.get_vocab_size(), seed), tok, CHATML, 256)


def _save(folder: Path, model, tok, template: str, context: int) -> Path:
    """A model folder as Hugging Face writes one: weights, tokenizer, ChatML specials, template."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": template, "model_max_length": context,
    }))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def _permute_qk(w, n_heads: int):
    """llama.cpp's converter: Hugging Face rotate-half rows -> interleaved rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | Path, arch: str = "llama", qtype: str = "F32", seed: int = 0, extra_tokens: int = 0) -> Path:
    """A tiny random model as GGUF; `extra_tokens` unused control tokens widen its vocabulary."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    vocab = tok.get_vocab_size() + extra_tokens
    model = _hf_model(arch, vocab, seed)
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(vocab)
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype])

    # tokenizer metadata as llama.cpp writes a gpt2-style BPE
    data = json.loads(tok.to_str())
    inv = {i: t for t, i in data["model"]["vocab"].items()}
    for added in data["added_tokens"]:
        inv[added["id"]] = added["content"]
    tokens = [inv.get(i, f"<|extra_{i}|>") for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in SPECIALS or t.startswith("<|extra_") else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    gq = GGMLQuantizationType[qtype]

    def add(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(name, arr)
        elif gq == GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif gq == GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, gq), raw_dtype=gq)

    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    permute = arch == "llama"  # llama.cpp keeps qwen2's Hugging Face q/k layout
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if permute:
            q, k = _permute_qk(q, heads), _permute_qk(k, kv)
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", q)
        add(f"blk.{i}.attn_k.weight", k)
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        for b in ("q", "k", "v"):
            if p + f"self_attn.{b}_proj.bias" in sd:
                add(f"blk.{i}.attn_{b}.bias", sd[p + f"self_attn.{b}_proj.bias"])
        for b in ("q", "k"):  # qwen3's per-head norms
            if p + f"self_attn.{b}_norm.weight" in sd:
                add(f"blk.{i}.attn_{b}_norm.weight", sd[p + f"self_attn.{b}_norm.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# A reasoning model in the DeepSeek-R1 style: the template opens <think> in the generation prompt
# and strips earlier answers' reasoning. Its weights are built, not random, so that greedy decoding
# always gives the same reasoning and answer: every layer's output projections are zero (each
# position's hidden state is its token's embedding) and the head maps each token of a fixed chain
# to the next one.
THINKER_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
# Qwen3's way: the model opens the block itself; enable_thinking=False closes an empty one
QWEN3_THINKER_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
THINKER_REASONING = "Hmm, let me think."
THINKER_ANSWER = "The answer is 42."


def write_tiny_thinker(dir: str | Path, style: str = "r1", special_tags: bool = False) -> Path:
    """A tiny Llama whose greedy answer to anything is <think>THINKER_REASONING</think> then
    THINKER_ANSWER; told not to think (an empty block closes the prompt) it gives the answer alone.
    style "r1": the template opens the block; "qwen3": the model does (after "assistant\n").
    special_tags: the vocabulary marks <think> and </think> special (as some GGUFs' CONTROL type)."""
    from tokenizers import AddedToken

    tags = [AddedToken(t, normalized=False, special=special_tags) for t in ("<think>", "</think>")]
    added = tags + [AddedToken(t, normalized=False) for t in ("\n\n", THINKER_REASONING, THINKER_ANSWER)]
    chain = ("Ċ", THINKER_REASONING, "</think>", "\n\n", THINKER_ANSWER, "<|im_end|>")
    if style == "qwen3":
        chain = ("Ċ", "<think>", *chain[1:])
    return write_chain_model(dir, added, chain, QWEN3_THINKER_TEMPLATE if style == "qwen3" else THINKER_TEMPLATE)


# A tool-calling model in the Hermes / Qwen2.5 style: the template lists the tools in the system
# turn, renders earlier calls and their results; the model answers with one call.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "Answer a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message['content'] or '' }}"
    "{% for call in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}


def write_tiny_tool_caller(dir: str | Path, special_tags: bool = False, thinks: bool = False) -> Path:
    """A tiny Llama whose greedy answer to anything is <tool_call>TOOL_CALL_JSON</tool_call>
    (`special_tags`: the vocabulary marks the two tags special, as some do; `thinks`: it reasons
    first, as Qwen3 does: <think>THINKER_REASONING</think> then the call)."""
    from tokenizers import AddedToken

    added = [AddedToken(t, normalized=False, special=special_tags) for t in ("<tool_call>", "</tool_call>")]
    added += [AddedToken(t, normalized=False) for t in ("<tool_response>", "</tool_response>", f"\n{TOOL_CALL_JSON}\n")]
    chain: tuple[str, ...] = ("Ċ", "<tool_call>", f"\n{TOOL_CALL_JSON}\n", "</tool_call>", "<|im_end|>")
    template = TOOLS_TEMPLATE
    if thinks:
        added += [AddedToken(t, normalized=False) for t in ("<think>", "</think>", "\n\n", THINKER_REASONING)]
        chain = ("Ċ", "<think>", THINKER_REASONING, "</think>", "\n\n", *chain[1:])
        template += "{# earlier answers' </think> blocks are the model's own #}"  # marks it a reasoning model
    return write_chain_model(dir, added, chain, template)


FIM_MIDDLE = "    return a + b"


def write_tiny_infiller(dir: str | Path) -> Path:
    """A tiny code model with Qwen2.5-Coder's fill-in-the-middle tokens whose greedy middle is
    always FIM_MIDDLE, then <|endoftext|>, as an instruct model's (its EOS is <|im_end|>)."""
    from tokenizers import AddedToken

    added = [AddedToken(t, normalized=False, special=True) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]
    added.append(AddedToken(FIM_MIDDLE, normalized=False))
    return write_chain_model(dir, added, ("<|fim_middle|>", FIM_MIDDLE, "<|endoftext|>"), CHATML)


RELUCTANT_ANSWER = "Sunny, I think."


def write_tiny_reluctant_caller(dir: str | Path) -> Path:
    """A tiny Hermes-format Llama whose greedy answer is RELUCTANT_ANSWER, but which, once its
    answer opens with <tool_call>, goes on with TOOL_CALL_JSON: a call only when one is forced."""
    from tokenizers import AddedToken

    added = [AddedToken(t, normalized=False) for t in ("<tool_call>", "</tool_call>", f"\n{TOOL_CALL_JSON}\n", RELUCTANT_ANSWER)]
    chain = ("Ċ", RELUCTANT_ANSWER, "<|im_end|>", "<tool_call>", f"\n{TOOL_CALL_JSON}\n", "</tool_call>", "<|im_end|>")
    return write_chain_model(dir, added, chain, TOOLS_TEMPLATE)


def write_tiny_pipe_caller(dir: str | Path) -> Path:
    """A tiny Llama that calls as Granite 3 does: <|tool_call|>[TOOL_CALL_JSON]."""
    from tokenizers import AddedToken

    calls = f"[{TOOL_CALL_JSON}]"
    added = [AddedToken("<|tool_call|>", normalized=False, special=True), AddedToken(calls, normalized=False)]
    template = TOOLS_TEMPLATE.replace("<tool_call>", "<|tool_call|>[").replace("</tool_call>", "]")
    return write_chain_model(dir, added, ("Ċ", "<|tool_call|>", calls, "<|im_end|>"), template)


def write_chain_model(dir: str | Path, added: list, chain: tuple[str, ...], template: str) -> Path:
    """A tiny Llama (safetensors folder) whose greedy output after the token chain[0] is always the
    rest of `chain`: every layer's output projections are zero (each position's hidden state is its
    token's embedding) and the head maps each token of the chain to the next. `added`: tokens
    (tokenizers.AddedToken) the chain needs beyond the trained vocabulary."""
    import torch

    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    tok.add_tokens(added)
    ids = [tok.token_to_id(t) for t in chain]
    model = _hf_model("llama", tok.get_vocab_size(), seed=3, context=1024)  # room for a tools preamble
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.normal_(0.0, 0.02)
        for src, dst in zip(ids, ids[1:]):
            head[dst] = 4.0 * emb[src] / emb[src].norm()
    return _save(folder, model, tok, template, 1024)


@contextmanager
def engine_on(folder: str | Path, max_batch: int = 2) -> Iterator:
    """An Engine (no warm-up) with the model at `folder` loaded; shut down after."""
    from influence_tui.config import Settings
    from influence_tui.engine import Engine

    engine = Engine(Settings(warmup_tokens=0), max_batch=max_batch)
    try:
        engine.load(str(folder))
        yield engine
    finally:
        engine.shutdown()
