"""One measurement of one engine, in a fresh process (so peak RSS is that engine's own).

    python benchmarks/engines.py ours|llamacpp|transformers --prompt-tokens 509 --decode-tokens 128 [--device cuda]

Prints one JSON line: load_s, prefill_tok_s, decode_tok_s, peak_rss_mb, prompt_tokens, first_ids
(and peak_gpu_mb on CUDA). Greedy, EOS ignored, 2 threads. run.py calls this A B A B so that the
machine's drift cancels.

Prefill is measured as llama-bench measures it, the same way for every engine: one untimed
warm-up prompt of the full length, then PREFILL_REPS timed prompts from position 0, their median
(prefill_runs lists each). What a first prompt costs in a fresh process (memory faulted in for the
first time) is measured by run.py's part 3, a cold prompt's time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

TEXT = (
    "The history of the city is long and full of stories about its people, its rivers and its bridges. "
    "Merchants came from far away to trade wool, salt and spices, and the markets grew every year. "
)


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, the high-water mark of its address space. Not
    getrusage's ru_maxrss: Linux carries that across exec from the forked parent, so a child of
    run.py (torch imported, ~280 MB) reported the parent's peak whatever it used itself."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bundled() -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from influence_tui.library import bundled_gguf_path

    return str(bundled_gguf_path())


def prompt_ids(encode, n: int) -> list[int]:
    return encode(TEXT * 64)[:n]


PREFILL_REPS = 3


def timed_prefills(run, n: int, device: str = "cpu") -> list[float]:
    """tokens/s of PREFILL_REPS calls of `run` (one n-token prompt from position 0 each)."""
    out = []
    for _ in range(PREFILL_REPS):
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        out.append(n / (time.perf_counter() - t))
    return out


def prefill_result(runs: list[float]) -> dict:
    return dict(prefill_tok_s=sorted(runs)[len(runs) // 2], prefill_runs=[round(r, 1) for r in runs])


def _sync(device: str) -> None:
    """Wait for the GPU: its kernels run asynchronously, so a timer must stop after them."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_ours(path: str, n_prompt: int, n_decode: int, threads: int, device: str = "cpu") -> dict:
    import contextlib

    from influence_tui.engine.native_model import load_native

    # what the engine loads: the kernel's torch-free model where it applies (CPU, converted weights
    # on disk), else the torch model (a GPU, or the first load, which converts the GGUF)
    t0 = time.perf_counter()
    lm = load_native(path, device=device, max_batch=1, max_seq=1024)
    load_s = time.perf_counter() - t0
    if lm is not None:
        lm.model.set_threads(threads)
    else:
        import torch

        torch.set_num_threads(threads)
        from influence_tui.engine.loader import load_model

        t0 = time.perf_counter()
        lm = load_model(path, device=device, max_batch=1, max_seq=1024)
        load_s = time.perf_counter() - t0
    m = lm.model
    ids = prompt_ids(lambda t: lm.tokenizer.encode(t), n_prompt)
    from influence_tui.engine.sampling import greedy
    from influence_tui.engine.scheduler import CHUNK

    torch_mod = sys.modules.get("torch")
    with torch_mod.inference_mode() if torch_mod is not None else contextlib.nullcontext():
        # the engine's own prompt path: kernel rows, or dense chunks where they are faster
        m.prefill_chunked(0, ids, 0, CHUNK)  # warm-up, as every engine gets one
        runs = timed_prefills(lambda: m.prefill_chunked(0, ids, 0, CHUNK), len(ids), device)
        logits = m.prefill_chunked(0, ids, 0, CHUNK)
        out = []
        tok = greedy(logits)[0]  # the scheduler's greedy pick
        t = time.perf_counter()
        for i in range(n_decode):
            out.append(tok)
            logits = m.decode([0], [tok], [len(ids) + i])
            tok = greedy(logits)[0]
        decode_s = time.perf_counter() - t
    return dict(load_s=load_s, **prefill_result(runs), decode_tok_s=n_decode / decode_s,
                prompt_tokens=len(ids), first_ids=out[:16], weights=lm.extra.get("weights"),
                torch_imported="torch" in sys.modules)


def run_llamacpp(path: str, n_prompt: int, n_decode: int, threads: int, device: str = "cpu") -> dict:
    import llama_cpp.llama_cpp as lib
    import numpy as np
    from llama_cpp import Llama

    # use_extra_bufts=False (the CLI's --no-repack): the stock build segfaults in its AMX repack
    # path on this CPU (llama.cpp #20824). Llama() has no keyword for it, so patch the defaults.
    defaults = lib.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_repack
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), n_prompt)

    def prefill() -> None:
        llm.reset()  # position 0: eval drops the cache entries from there on
        llm.eval(ids)

    prefill()  # warm-up
    runs = timed_prefills(prefill, len(ids))
    prefill()
    out = []
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    t = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(last_logits()))
        out.append(tok)
        llm.eval([tok])
    decode_s = time.perf_counter() - t
    return dict(load_s=load_s, **prefill_result(runs), decode_tok_s=n_decode / decode_s,
                prompt_tokens=len(ids), first_ids=out[:16])


def run_transformers(path: str, n_prompt: int, n_decode: int, threads: int, device: str = "cpu") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16).eval().to(device)
    _sync(device)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lambda t: tok.encode(t, add_special_tokens=False), n_prompt)
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        model(x)  # warm-up
        runs = timed_prefills(lambda: model(x), len(ids), device)
        prefill_s = len(ids) / prefill_result(runs)["prefill_tok_s"]
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False)
        _sync(device)
        total = time.perf_counter() - t
    decode_s = max(total - prefill_s, 1e-9)
    return dict(load_s=load_s, **prefill_result(runs), decode_tok_s=(n_decode - 1) / decode_s,
                prompt_tokens=len(ids), first_ids=out[0, len(ids):len(ids) + 16].tolist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=("ours", "llamacpp", "transformers"))
    ap.add_argument("--path", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=509)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: ours and transformers on the GPU")
    a = ap.parse_args()
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --device cuda: torch sees no CUDA GPU here")
        if a.engine == "llamacpp":
            sys.exit("error: the llama.cpp reference is a CPU build; compare on CUDA against transformers")
    path = a.path or bundled()
    fn = {"ours": run_ours, "llamacpp": run_llamacpp, "transformers": run_transformers}[a.engine]
    result = fn(path, a.prompt_tokens, a.decode_tokens, a.threads, a.device)
    result["peak_rss_mb"] = peak_rss_mb()
    if a.device == "cuda":
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
