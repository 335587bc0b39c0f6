"""Influence's speed and memory against reference engines, measured in one run.

    .venv/bin/python benchmarks/run.py [--rounds 3] [--skip-transformers] [--quick] [--device cuda]

1. Load, prefill (509-token prompt) and decode (128 tokens, EOS ignored) tok/s and peak RSS for
   this engine, llama.cpp (llama-cpp-python, optional: `pip install llama-cpp-python`) and
   transformers, each in a fresh process, alternated A B C A B C so the machine's drift cancels.
   Prefill as llama-bench measures it: a full-length warm-up prompt, then the median of 3 timed
   ones (engines.py). Medians with min/max, and ratios against llama.cpp and transformers: of
   the medians, and per round (the median of each round's own ratios, with min-max).
2. What weight-only quantization costs: greedy agreement and perplexity, fast path vs float.
3. Through the engine: a cold 547-token prompt's time to first token; 8 requests sharing a long
   system prompt on a cold cache, its prefix computed once vs each prompt in full; multi-turn
   chat, time to first token of turn 10 vs turn 1 (the KV cache kept between turns), each
   conversation's turn 10 against the next one's turn 1 over 5 pairs; one stream with the default
   sampling settings vs greedy.
4. Concurrency: 8 streams through continuous batching vs 1 stream, alternated over 5 rounds;
   answers identical to alone. The same through the API server and the official ollama client.
5. `--batch`-style: 32 prompts submitted together vs one after another.

With --device cuda, part 1 runs this engine and transformers on the GPU (bf16; llama.cpp's
reference is a CPU build and is left out) and writes results/latest-cuda.json; parts 3-5 run where
the engine puts itself (CUDA when torch sees a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> str:
    """The matrix units that decide prefill speed: AMX tiles (Intel) or AVX-512 BF16 only."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "flags unknown"
    return ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512_vnni") if f in flags) or "no AVX-512 BF16"


def run_json(cmd: list[str], what: str) -> tuple[dict | None, list[str]]:
    """Run cmd in a fresh process: (the JSON object on its last stdout line, the lines before it),
    or (None, []) with a one-line failure on stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        print(f"  {what} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None, []
    return json.loads(lines[-1]), lines[:-1]


def measure_engines(rounds: int, engines: list[str], prompt_tokens: int, decode_tokens: int,
                    device: str = "cpu") -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(rounds):
        for engine in engines:
            cmd = [sys.executable, str(HERE / "engines.py"), engine, "--prompt-tokens", str(prompt_tokens),
                   "--decode-tokens", str(decode_tokens), "--device", device]
            d, _ = run_json(cmd, f"{engine} round {r + 1}")
            if d is None:
                continue
            runs[engine].append(d)
            torch_note = "" if "torch_imported" not in d else " (torch loaded)" if d["torch_imported"] else " (torch not loaded)"
            print(f"  round {r + 1} {engine:12s} load {d['load_s']:.2f}s prefill {d['prefill_tok_s']:.0f} tok/s decode {d['decode_tok_s']:.1f} tok/s rss {d['peak_rss_mb']:.0f} MB{torch_note}", flush=True)
    return runs


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values):,.2f} ({min(values):,.2f}-{max(values):,.2f})" if values else "-"


def engine_table(runs: dict[str, list[dict]]) -> dict:
    metrics = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")
    med = {e: {m: statistics.median([r[m] for r in rs]) for m in metrics} for e, rs in runs.items() if rs}
    print("\n| engine | load s | prefill tok/s | decode tok/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for engine, rs in runs.items():
        if rs:
            print(f"| {engine} | " + " | ".join(_stat([r[m] for r in rs]) for m in metrics) + " |")
    for engine, rs in runs.items():
        if rs and "peak_gpu_mb" in rs[0]:
            print(f"{engine}: peak GPU memory {_stat([r['peak_gpu_mb'] for r in rs])} MB on {rs[0].get('gpu', 'the GPU')}")
    for ref in ("llamacpp", "transformers"):
        if "ours" in med and ref in med:
            o, x = med["ours"], med[ref]
            print(f"\nours vs {ref}: decode {o['decode_tok_s'] / x['decode_tok_s']:.2f}x, prefill {o['prefill_tok_s'] / x['prefill_tok_s']:.2f}x, "
                  f"load {o['load_s']:.2f}s vs {x['load_s']:.2f}s, peak RSS {o['peak_rss_mb'] / x['peak_rss_mb']:.2f}x")
            # each round's pair ran minutes apart from the others: its own ratio is what the
            # alternation protects from the machine's drift
            paired = {m: [a[m] / b[m] for a, b in zip(runs["ours"], runs[ref])] for m in ("decode_tok_s", "prefill_tok_s")}
            print(f"  per round (a round runs the engines one after the other): decode {_stat(paired['decode_tok_s'])}x, "
                  f"prefill {_stat(paired['prefill_tok_s'])}x")
    return med


def quant_quality(path: str, n_steps: int = 32) -> dict:
    """Greedy agreement (teacher-forced on the float model's own continuation) and perplexity."""
    import math

    import torch

    from influence_tui.engine.loader import load_model

    fast = load_model(path, device="cpu", max_batch=1, max_seq=1024)
    ref = load_model(path, device="cpu", dtype="float32", quant="none", max_batch=1, max_seq=1024)
    tok = ref.tokenizer
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
               "List three prime numbers.", "How do I reverse a list in Python?", "Who wrote Hamlet?"]
    agree = total = agree_k = 0
    kernel = bool(getattr(fast.model, "native", False))
    with torch.inference_mode():
        for p in prompts:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
            seq = list(ids)
            logits = ref.model.prefill(0, torch.tensor(seq), 0)
            for _ in range(n_steps):  # the float model's greedy continuation
                seq.append(int(logits.argmax()))
                logits = ref.model.decode(torch.tensor([0]), torch.tensor([seq[-1]]), torch.tensor([len(seq) - 1]))[0]
            a = ref.model.prefill(0, torch.tensor(seq), 0, all_logits=True).argmax(-1)[len(ids) - 1:-1]
            b = fast.model.prefill(0, torch.tensor(seq), 0, all_logits=True).argmax(-1)[len(ids) - 1:-1]
            agree += int((a == b).sum())
            total += a.numel()
            if kernel:  # the same positions as decode steps of the C kernel (int8 activations)
                fast.model.prefill(0, torch.tensor(ids[:-1]), 0)
                for j, pos in enumerate(range(len(ids) - 1, len(seq) - 1)):
                    step = fast.model.decode(torch.tensor([0]), torch.tensor([seq[pos]]), torch.tensor([pos]))[0]
                    agree_k += int(int(step.argmax()) == int(a[j]))
        text = ("The quick brown fox jumps over the lazy dog. Scientists study the natural world by observation and "
                "experiment. Rivers flow from the mountains to the sea, carrying water and sediment with them. ") * 3
        ids = torch.tensor(tok.encode(text))
        ppl = {}
        for name, lm in (("float32", ref), ("fast", fast)):
            logits = lm.model.prefill(0, ids, 0, all_logits=True).float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
            ppl[name] = math.exp(float(nll))
        if kernel:
            steps = [fast.model.decode(torch.tensor([0]), ids[i : i + 1], torch.tensor([i]))[0].float() for i in range(len(ids) - 1)]
            ppl["kernel"] = math.exp(float(torch.nn.functional.cross_entropy(torch.stack(steps), ids[1:])))
    result = {"greedy_agreement": agree / total, "ppl_float32": ppl["float32"], "ppl_fast": ppl["fast"], "weights": fast.extra.get("weights")}
    print(f"\nquantization ({result['weights']}): greedy agreement with float32 {result['greedy_agreement']:.1%} over {total} tokens; "
          f"perplexity {ppl['fast']:.2f} vs {ppl['float32']:.2f} float32 ({ppl['fast'] / ppl['float32']:.3f}x)")
    if kernel:
        result.update(kernel_greedy_agreement=agree_k / total, ppl_kernel=ppl["kernel"])
        print(f"  decode steps in the C kernel (int8 activations): greedy agreement {agree_k / total:.1%}, perplexity {ppl['kernel']:.2f}")
    return result


def engine_level(quick: bool) -> dict:
    from influence_tui.config import Settings
    from influence_tui.engine import ChatMessage, Engine, GenerationRequest
    from influence_tui.params import GenerationParams

    engine = Engine(Settings.load(env={}, use_file=False), max_batch=8, max_queue=256)
    engine.load()
    greedy = GenerationParams(temperature=0, max_tokens=48, repeat_penalty=1.0)
    out: dict = {}

    # a long prompt from a cold cache, through the scheduler (128-position chunks, the tail as kernel rows)
    from engines import TEXT

    long_prompt = TEXT * 12
    r = engine.generate(GenerationRequest(prompt=long_prompt, params=greedy.with_(max_tokens=1)))
    out["cold_prompt_tokens"], out["cold_ttft_s"] = r.usage.prompt_tokens, r.usage.ttft_s
    print(f"\ncold prompt through the engine: {r.usage.prompt_tokens} tokens, first token after {r.usage.ttft_s * 1000:.0f} ms "
          f"({r.usage.prompt_tokens / r.usage.ttft_s:.0f} tok/s)")

    out.update(shared_prefix_burst(engine, 1 if quick else 3))

    # multi-turn: TTFT per turn with the conversation growing. Each conversation has its own system
    # prompt (so its turn 1 is cold); a turn's TTFT is tens of milliseconds and the machine drifts
    # over seconds, so each conversation's turn 10 is compared with the next one's turn 1, measured
    # right after it (A B A B, as everywhere in this benchmark)
    firsts, tenths, ratios = [], [], []
    for c in range(2 if quick else 6):
        msgs = [ChatMessage("system", f"You are a helpful assistant (conversation {c}).")]
        ttft, cached = [], []
        for turn in range(10):
            msgs.append(ChatMessage("user", f"Tell me one short fact about the number {turn + 1}."))
            r = engine.generate(GenerationRequest(messages=list(msgs), params=greedy.with_(max_tokens=40)))
            msgs.append(ChatMessage("assistant", r.text))
            ttft.append(r.usage.ttft_s)
            cached.append((r.usage.cached_tokens, r.usage.prompt_tokens))
        if tenths:
            ratios.append(tenths[-1] / ttft[0])
        firsts.append(ttft[0])
        tenths.append(ttft[-1])
    out["ttft_turn1_s"], out["ttft_turn10_s"] = statistics.median(firsts[1:]), statistics.median(tenths[:-1])
    out["ttft_ratio"] = statistics.median(ratios)
    print(f"multi-turn: TTFT turn 1 {out['ttft_turn1_s'] * 1000:.0f} ms, turn 10 {out['ttft_turn10_s'] * 1000:.0f} ms "
          f"(turn 10 / the next conversation's turn 1: {_stat(ratios)}x over {len(ratios)} pairs); "
          f"turn 10 reused {cached[-1][0]} of {cached[-1][1]} prompt tokens")

    out.update(sampled_vs_greedy(engine, 1 if quick else 3))

    # concurrency: 8 streams vs 1, alternated round by round (the machine's drift hits both)
    prompts = [f"Write two sentences about animal number {i}." for i in range(8)]
    p = greedy.with_(max_tokens=64, ignore_eos=True)
    answer = lambda r: (r.text, r.usage.completion_tokens)  # noqa: E731
    out.update(alternate(
        "concurrency", 1 if quick else 5,
        lambda: [answer(engine.generate(GenerationRequest(prompt=q, params=p))) for q in prompts],
        lambda: [answer(s.wait()) for s in [engine.submit(GenerationRequest(prompt=q, params=p)) for q in prompts]],
    ))

    # the same through the API server on 127.0.0.1 and the official ollama client, streaming
    out.update(_through_server(engine, prompts, 1 if quick else 5))

    # batch: 32 prompts together vs one by one
    n = 8 if quick else 32
    batch_prompts = [f"Give a one-line tip about topic {i}." for i in range(n)]
    p = greedy.with_(max_tokens=32, ignore_eos=True)
    t = time.perf_counter()
    for q in batch_prompts:
        engine.generate(GenerationRequest(prompt=q, params=p))
    seq_s = time.perf_counter() - t
    t = time.perf_counter()
    ss = [engine.submit(GenerationRequest(prompt=q, params=p)) for q in batch_prompts]
    for s in ss:
        s.wait()
    batch_s = time.perf_counter() - t
    out.update(batch_seq_s=seq_s, batch_s=batch_s)
    print(f"batch of {n}: {n * 32 / batch_s:.0f} tok/s together vs {n * 32 / seq_s:.0f} tok/s one by one ({seq_s / batch_s:.2f}x)")
    engine.shutdown()
    return out


def sampled_vs_greedy(engine, rounds: int) -> dict:
    """One stream of 128 tokens with the default sampling settings (temperature 0.7, top-p 0.9,
    repeat penalty 1.1, seeded) against greedy, alternated: what picking a token costs a user."""
    from influence_tui.engine import GenerationRequest
    from influence_tui.params import GenerationParams

    settings = {"greedy": GenerationParams(temperature=0, repeat_penalty=1.0), "sampled": GenerationParams(seed=1)}
    rates: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(rounds):
        for name, p in settings.items():
            r = engine.generate(GenerationRequest(prompt="Tell me a story about a lighthouse keeper.",
                                                  params=p.with_(max_tokens=128, ignore_eos=True)))
            rates[name].append(r.usage.completion_tokens / r.usage.decode_s)
    g, s = statistics.median(rates["greedy"]), statistics.median(rates["sampled"])
    print(f"one stream, 128 tokens: {s:.0f} tok/s with the default sampling settings vs {g:.0f} greedy ({s / g:.2f}x)")
    return {"sampled_tok_s": s, "greedy_tok_s": g}


def shared_prefix_burst(engine, rounds: int) -> dict:
    """8 requests with one long system prompt arriving together on a cold cache (a --batch file,
    a burst of API calls): time until every one has its first token, with the shared prefix
    computed once, against each prompt computed in full (the same run, alternated)."""
    from engines import TEXT

    from influence_tui.engine import ChatMessage, GenerationRequest
    from influence_tui.engine import scheduler
    from influence_tui.params import GenerationParams

    one = GenerationParams(temperature=0, max_tokens=1, repeat_penalty=1.0)
    shared_min = scheduler.SHARE_MIN
    times: dict[bool, list[float]] = {True: [], False: []}
    cached, prompt_tokens = 0, 0
    for r in range(rounds):
        for share in (True, False):
            system = f"Session {r}-{share}. " + TEXT * 11  # new each time: nothing cached
            reqs = [GenerationRequest(messages=[ChatMessage("system", system), ChatMessage("user", f"Question {i}: what happened next?")],
                                      params=one) for i in range(8)]
            scheduler.SHARE_MIN = shared_min if share else 1 << 30
            try:
                t = time.perf_counter()
                results = [s.wait() for s in engine.submit_many(reqs)]
                times[share].append(time.perf_counter() - t)
            finally:
                scheduler.SHARE_MIN = shared_min
            if share:
                cached, prompt_tokens = sum(x.usage.cached_tokens for x in results), sum(x.usage.prompt_tokens for x in results)
    a, b = statistics.median(times[True]), statistics.median(times[False])
    print(f"8 requests with a shared {prompt_tokens // 8}-token prompt, cold cache: all first tokens after {a * 1000:.0f} ms "
          f"with the prefix computed once ({cached} of {prompt_tokens} prompt tokens copied) vs {b * 1000:.0f} ms each in full "
          f"({b / a:.2f}x)")
    return {"shared_burst_s": a, "unshared_burst_s": b, "shared_burst_cached": cached, "shared_burst_prompt_tokens": prompt_tokens}


def alternate(label: str, rounds: int, alone, together) -> dict:
    """Tokens/s of the prompts one after another (`alone`) and all at once (`together`), each a
    callable giving [(text, completion tokens)], alternated round by round so that the machine's
    drift hits both; medians, the ratio's min-max, and how many answers were the same each round."""
    singles, togethers, same = [], [], None
    for _ in range(rounds):
        rates, texts = [], []
        for run in (alone, together):
            t = time.perf_counter()
            answers = run()
            rates.append(sum(n for _, n in answers) / (time.perf_counter() - t))
            texts.append([text for text, _ in answers])
        singles.append(rates[0])
        togethers.append(rates[1])
        agree = sum(a == b for a, b in zip(*texts))
        same = agree if same is None else min(same, agree)
    ratios = [b / a for a, b in zip(singles, togethers)]
    print(f"{label}: 8 streams {statistics.median(togethers):.0f} tok/s vs 1 stream {statistics.median(singles):.0f} tok/s, "
          f"ratio {_stat(ratios)}x over {rounds} alternated rounds; {same}/8 answers identical to alone (greedy) in every round")
    return {"single_tok_s": statistics.median(singles), "concurrent_tok_s": statistics.median(togethers),
            "concurrency_ratio": statistics.median(ratios), "identical": same}


def _through_server(engine, prompts: list[str], rounds: int) -> dict:
    """8 streaming /api/generate requests at once vs one after another, as a client sees them
    (HTTP, JSON lines, the server's event loop sharing the CPU with the engine and the client)."""
    import asyncio

    import ollama

    from influence_tui.config import Settings
    from influence_tui.server import ServerRunner

    runner = ServerRunner(engine, Settings.load(env={}, use_file=False), host="127.0.0.1", port=0)
    url = runner.start()
    opts = {"temperature": 0, "num_predict": 64, "repeat_penalty": 1.0}

    async def one(client, prompt: str) -> tuple[str, int]:
        parts, n = [], 0
        async for part in await client.generate(model="smollm2", prompt=prompt, options=opts, stream=True):
            parts.append(part.response)
            n = part.eval_count or n
        return "".join(parts), n

    async def alone() -> list[tuple[str, int]]:
        client = ollama.AsyncClient(host=url)
        return [await one(client, q) for q in prompts]

    async def together() -> list[tuple[str, int]]:
        client = ollama.AsyncClient(host=url)
        return list(await asyncio.gather(*(one(client, q) for q in prompts)))

    try:
        figures = alternate("through the server (ollama client, streaming)", rounds,
                            lambda: asyncio.run(alone()), lambda: asyncio.run(together()))
    finally:
        runner.stop()
    return {f"http_{key}": value for key, value in figures.items()}


def engine_level_fresh(quick: bool) -> dict:
    """engine_level in a fresh process: torch already used on this process's main thread (the
    quantization part) would give the engine's worker thread a second OpenMP team, and libgomp
    sleeps at its barriers when there are more OpenMP threads than CPUs (the app never does that:
    only the worker runs torch)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine-level"] + (["--quick"] if quick else [])
    result, printed = run_json(cmd, "engine-level run")
    print("\n".join(printed), flush=True)
    return result or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and prompts")
    ap.add_argument("--prompt-tokens", type=int, default=509)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where part 1 runs this engine and transformers")
    ap.add_argument("--engine-level", action="store_true", help=argparse.SUPPRESS)  # part 3-5 alone, JSON last
    a = ap.parse_args()
    if a.engine_level:
        print(json.dumps(engine_level(a.quick)))
        return
    import torch

    from influence_tui.engine.native import vectorized

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs ({cpu_flags()}), torch {torch.__version__}, threads 2, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, C decode kernel: {'yes' if vectorized() else 'no (torch int4 kernel)'}")
    if a.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda: torch sees no CUDA GPU here")
        print(f"GPU: {torch.cuda.get_device_name()} (bf16; the llama.cpp reference is a CPU build and is left out)")
    engines = ["ours"]
    if a.device == "cuda":
        pass
    elif importlib.util.find_spec("llama_cpp"):
        engines.append("llamacpp")
    else:
        print("llama-cpp-python is not installed: the llama.cpp reference is skipped (pip install llama-cpp-python)")
    if not a.skip_transformers:
        engines.append("transformers")
    rounds = 1 if a.quick else a.rounds
    if a.device == "cpu":  # the converted weights on disk first: every measured run of ours loads as the engine does
        from influence_tui.engine.loader import load_model
        from influence_tui.library import bundled_gguf_path

        load_model(str(bundled_gguf_path()), device="cpu", max_batch=1, max_seq=64)
    runs = measure_engines(rounds, engines, a.prompt_tokens, a.decode_tokens, a.device)
    report = {"engines": engine_table(runs), "runs": runs}
    from influence_tui.library import bundled_gguf_path

    report["quantization"] = quant_quality(str(bundled_gguf_path()))
    report["engine"] = engine_level_fresh(a.quick)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = "latest-cuda.json" if a.device == "cuda" else "latest.json"
    (out / name).write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out / name}")


if __name__ == "__main__":
    main()
