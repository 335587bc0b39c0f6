from collections import Counter

import torch

from influence_tui.engine.sampling import Sampler, StopMatcher, filtered_probs
from influence_tui.params import GenerationParams


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = filtered_probs(logits, GenerationParams(temperature=1.0, top_k=2, top_p=1.0))
    assert set(torch.nonzero(probs).flatten().tolist()) == {1, 3}


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs(logits, GenerationParams(temperature=1.0, top_p=0.7))
    assert set(torch.nonzero(probs).flatten().tolist()) == {0, 1}
    probs = filtered_probs(logits, GenerationParams(temperature=1.0, top_p=0.85))
    assert set(torch.nonzero(probs).flatten().tolist()) == {0, 1, 2}


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.06, 0.04]))
    probs = filtered_probs(logits, GenerationParams(temperature=1.0, top_p=1.0, min_p=0.2))
    assert set(torch.nonzero(probs).flatten().tolist()) == {0, 1}


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    s = Sampler(GenerationParams(temperature=0, repeat_penalty=2.0))
    out = s.apply_penalties(torch.tensor([4.0, -1.0, 3.0]), history=[0, 1])
    assert out.tolist() == [2.0, -2.0, 3.0]


def test_presence_and_frequency_penalties_count_generated_tokens():
    s = Sampler(GenerationParams(temperature=0, repeat_penalty=1.0, presence_penalty=0.5, frequency_penalty=0.25))
    s.generated.update([2, 2, 1])
    out = s.apply_penalties(torch.zeros(3), history=[])
    assert out.tolist() == [0.0, -0.75, -1.0]


def test_greedy_penalty_changes_choice():
    s = Sampler(GenerationParams(temperature=0, repeat_penalty=10.0))
    assert s(torch.tensor([5.0, 4.0]), history=[0]) == 1


def test_same_seed_same_draws():
    logits = torch.randn(1000)
    a = Sampler(GenerationParams(temperature=1.0, top_p=1.0, seed=7, repeat_penalty=1.0))
    b = Sampler(GenerationParams(temperature=1.0, top_p=1.0, seed=7, repeat_penalty=1.0))
    assert [a(logits, []) for _ in range(20)] == [b(logits, []) for _ in range(20)]


def test_stop_matcher_across_deltas_and_never_emitted():
    m = StopMatcher(("###", "END"))
    out = "".join(m.feed(d) for d in ["Hello #", "#", " wor", "ld E", "N", "D tail"])
    assert out == "Hello ## world " and m.stopped
    m = StopMatcher(("###",))
    pieces = [m.feed(d) for d in ["ab#", "#", "#cd"]]
    assert "".join(pieces) == "ab" and m.stopped
    m = StopMatcher(("###",))
    pieces = [m.feed(d) for d in ["ab#", "#x"]]
    assert "".join(pieces) + m.flush() == "ab##x" and not m.stopped


def test_degenerate_distribution_falls_back_to_greedy():
    s = Sampler(GenerationParams(temperature=0.8, top_p=0.9, repeat_penalty=1.0, seed=1))
    logits = torch.full((5,), float("-inf"))
    logits[3] = float("-inf")
    assert s(logits, []) in range(5)  # no "invalid multinomial distribution" error
    s = Sampler(GenerationParams(temperature=0.8, top_p=0.0, seed=1))
    assert s(torch.tensor([0.0, 2.0, 1.0]), []) == 1  # top_p 0 keeps only the best token


def test_top_p_with_a_flat_distribution_keeps_half():
    # 5000 equal tokens: every one is a candidate, and top_p keeps the first half of them
    probs = filtered_probs(torch.zeros(5000), GenerationParams(temperature=1.0, top_p=0.5))
    assert int((probs > 0).sum()) in (2500, 2501)  # float rounding of the running sum


def test_any_integer_is_a_seed_but_minus_one_means_random():
    """Clients send negative and huge seeds: each is a seed, the same one gives the same draws;
    -1 is llama.cpp's and Ollama's "random" (Open WebUI sends it), a new seed each time."""
    import torch

    from influence_tui.engine.sampling import Sampler
    from influence_tui.params import GenerationParams, coerce

    logits = torch.randn(50)
    for seed in (-2, -11545843315441931395268608, 2**70 + 3):
        p = GenerationParams(temperature=1.0, seed=seed)
        a, b = Sampler(p), Sampler(p)
        assert [a(logits, []) for _ in range(5)] == [b(logits, []) for _ in range(5)], seed
    assert coerce("seed", -1) is None and coerce("seed", "-1") is None
    p = GenerationParams(temperature=1.0, seed=-1)
    assert len({Sampler(p).seed for _ in range(4)}) == 4


def test_greedy_picks_like_torch_argmax_on_rows_ties_and_nan():
    """The scheduler's batched greedy pick: each row's first largest logit, NaN counting as largest
    (as torch.argmax), for a batch, a single row and a non-contiguous row of a batch."""
    from influence_tui.engine.sampling import greedy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 49152, generator=g)
    x[2, 7] = x[2, 900] = x[2].max() + 1  # a tie: the first one wins
    x[5, 33] = float("nan")
    assert greedy(x) == x.argmax(dim=-1).tolist()
    assert greedy(x)[2] == 7 and greedy(x)[5] == 33
    assert greedy(x[3]) == [int(x[3].argmax())]
    assert greedy(x[:, ::2]) == x[:, ::2].argmax(dim=-1).tolist()
    assert greedy(x.to(torch.bfloat16)) == x.to(torch.bfloat16).argmax(dim=-1).tolist()


def _reference_candidates(logits: torch.Tensor, p: GenerationParams) -> dict[int, float]:
    """Top-k, min-p, top-p the plain way (full sorts, in torch): the kept ids and probabilities."""
    logits = logits.double() / p.temperature
    if p.top_k:
        kth = torch.sort(logits, descending=True).values[min(p.top_k, logits.numel()) - 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    best, ids = torch.sort(probs, descending=True, stable=True)
    if 0.0 < p.top_p < 1.0:
        keep = torch.cumsum(best, dim=-1) - best < p.top_p
        best, ids = best[keep], ids[keep]
    best, ids = best[best > 0], ids[best > 0]
    return dict(zip(ids.tolist(), (best / best.sum()).tolist()))


def test_candidates_keep_what_full_sorts_keep():
    """The sampler looks only at the tokens above a threshold when they suffice; on peaked and flat
    vocabularies of 50k it keeps the same tokens with the same probabilities as full sorts do."""
    from influence_tui.engine.sampling import candidates

    g = torch.Generator().manual_seed(3)
    settings = [dict(top_p=0.9), dict(top_p=0.95, top_k=40), dict(top_p=1.0, top_k=5), dict(top_p=0.5, min_p=0.05),
                dict(top_p=1.0, min_p=0.1), dict(top_p=0.99, temperature=1.5), dict(top_p=0.9, top_k=100_000)]
    for spread in (0.5, 3.0, 8.0):  # flat to peaked
        logits = torch.randn(49152, generator=g) * spread
        for kw in settings:
            p = GenerationParams(**({"temperature": 0.7} | kw))
            probs, ids = candidates(logits, p)
            want = _reference_candidates(logits, p)
            assert set(ids.tolist()) == set(want), (spread, kw)
            got = dict(zip(ids.tolist(), probs.tolist()))
            assert max(abs(got[i] - want[i]) for i in want) < 1e-5, (spread, kw)


def test_draws_follow_the_kept_distribution():
    """Inverse-CDF draws by blocks: the same index as a plain running sum, and frequencies that
    match the probabilities, zero-probability tokens never drawn."""
    import numpy as np

    from influence_tui.engine.sampling import draw

    rng = np.random.default_rng(0)
    for n in (3, 1000, 49152):
        probs = rng.random(n).astype(np.float32) ** 4
        probs[rng.random(n) < 0.3] = 0.0
        cdf = np.cumsum(probs, dtype=np.float64)
        for u in rng.random(200):
            assert draw(probs, u) == int(np.searchsorted(cdf, u * cdf[-1], side="right")), (n, u)
        assert probs[draw(probs, 1.0 - 1e-17)] > 0 and probs[draw(probs, 0.0)] > 0
    s = Sampler(GenerationParams(temperature=1.0, top_p=1.0, repeat_penalty=1.0, seed=5))
    target = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4])
    counts = Counter(s(target.log(), []) for _ in range(20000))
    assert counts[1] == 0
    for i in (0, 2, 3, 4):
        assert abs(counts[i] / 20000 - float(target[i])) < 0.015, counts


def test_a_repeat_penalty_of_zero_is_off():
    """Clients send repeat_penalty 0 to turn it off: no division by zero, the same picks as 1."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5000, generator=g).abs()  # positive logits: the penalty would divide them
    history = list(range(0, 5000, 7))
    for temperature in (0.0, 0.8):
        off = Sampler(GenerationParams(temperature=temperature, repeat_penalty=1.0, seed=3))
        zero = Sampler(GenerationParams(temperature=temperature, repeat_penalty=0.0, seed=3))
        assert [zero(logits, history) for _ in range(20)] == [off(logits, history) for _ in range(20)]
