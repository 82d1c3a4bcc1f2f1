"""Tests of paperlab.dynamic (chapter 41): the budget matching, the paired intervals, the clock share, and DeeR's exit
rule on the book's VLM, each against a closed form, a brute-force search or an independent computation."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from paperlab.core import count_flops
from paperlab.deer import simulate_exits
from paperlab.dynamic import (BUDGETS, clock_share, consistency_deltas, early_exit, exit_plan, exit_probabilities, first_answer,
                              forced_thresholds, match_budget, paired_bootstrap, prefill_logits, prompt_embeds, recognised,
                              run_counted, token_plan)
from paperlab.metrics import sample_quality
from paperlab.sgl import prefill_flops_formula
from paperlab.vlm import VLM_SIZES, TinyVLM, book_qa, drop_visual_tokens


def test_budgets_are_the_issue_s():
    assert BUDGETS == (0.75, 0.5, 0.25, 0.1)   # issue 27: 75 %, 50 %, 25 % and 10 % of full MACs


@pytest.mark.parametrize("budget", [1.0, 0.75, 0.5, 0.33, 0.1])
def test_match_budget_closed_form(budget):
    # cost a + b·k: the costliest k within the budget is floor((budget·full − a) / b)
    a, b, full = 30.0, 3.0, 150.0
    costs = {k: a + b * k for k in range(41)}
    m = match_budget(costs, full, budget)
    expected = int((budget * full - a) // b)
    if expected < 0:
        assert not m.reachable and m.knob is None and m.floor == pytest.approx(a / full)
    else:
        assert m.knob == min(expected, 40) and m.fraction == pytest.approx(costs[m.knob] / full) and m.fraction <= budget


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, float("nan"), True, "half"])
def test_match_budget_refuses_bad_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        match_budget({0: 1.0}, 2.0, bad)


def test_match_budget_refuses_bad_full_and_costs():
    with pytest.raises(ValueError, match="full"):
        match_budget({0: 1.0}, 0.0, 0.5)
    with pytest.raises(ValueError, match="costs"):
        match_budget({}, 1.0, 0.5)
    with pytest.raises(ValueError, match="costs"):
        match_budget({0: float("inf")}, 1.0, 0.5)


def test_token_plan_is_a_brute_force_scan():
    rng = np.random.default_rng(0)
    for _ in range(100):
        tab = {(K, k): c for K in range(4) for k, c in enumerate(np.cumsum(rng.uniform(0.1, 1, 37)) + 7 * K)}
        full, budget = tab[3, 36], float(rng.uniform(0.05, 1))
        layers = [3, 2, 1, 0]
        cap = budget * full
        brute = [(K, max(k for k in range(1, 37) if tab[K, k] <= cap)) for K in layers if tab[K, 1] <= cap]
        m = token_plan(lambda K, k: tab[K, k], full, budget, layers, 36)
        assert m.knob == (brute[0] if brute else None)
        assert m.floor == pytest.approx(min(tab[K, 1] for K in layers) / full)


def test_exit_plan_meets_the_cap_on_its_statistics():
    d = np.random.default_rng(1).uniform(size=(6, 500)).astype(np.float32)
    costs = [1, 2, 3, 4, 5, 6]
    for budget in (0.9, 0.6, 0.4, 0.2):
        m = exit_plan(d, costs, 6.0, budget)
        realised = np.asarray(costs)[simulate_exits(d, m.knob[1])].mean() / 6
        assert m.fraction == pytest.approx(realised) and budget - 0.03 < m.fraction <= budget
    assert not exit_plan(d, costs, 6.0, 0.1).reachable       # below the first exit (1/6)


def test_paired_bootstrap_known_cases():
    ones = np.ones(50)
    assert paired_bootstrap(ones, ones) == (1.0, 1.0, 1.0)
    v, lo, hi = paired_bootstrap(np.tile([1, 0], 25), ones)
    assert v == 0.5 and lo < 0.5 < hi
    d, lo, hi = paired_bootstrap(np.tile([1, 1, 0, 0], 10), np.tile([1, 0, 0, 0], 10), stat="diff")
    assert d == pytest.approx(0.25) and lo <= 0.25 <= hi
    # same seed, same interval; the interval narrows with more items
    assert paired_bootstrap(np.tile([1, 0], 25), ones, seed=3) == paired_bootstrap(np.tile([1, 0], 25), ones, seed=3)
    w_small = np.subtract(*paired_bootstrap(np.tile([1, 0], 10), np.ones(20))[2:0:-1])
    w_large = np.subtract(*paired_bootstrap(np.tile([1, 0], 500), np.ones(1000))[2:0:-1])
    assert w_large < w_small


def test_paired_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="one value per item"):
        paired_bootstrap(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="scores 0"):
        paired_bootstrap(np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match="stat"):
        paired_bootstrap(np.ones(5), np.ones(5), stat="max")


def test_clock_share():
    assert clock_share(2.0, 0.5) == pytest.approx(1.0)       # half the MACs, twice as fast: all of the cut
    assert clock_share(1.5, 0.5) == pytest.approx((1 - 1 / 1.5) / 0.5)
    assert clock_share(1.0, 0.25) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        clock_share(2.0, 1.0)
    with pytest.raises(ValueError, match="speedup"):
        clock_share(0.0, 0.5)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = TinyVLM(VLM_SIZES["large"]).eval()
    data = book_qa(10, seed=3)
    return model, data, prompt_embeds(model, data)


def test_prefill_is_the_model_and_full_budget_is_unpruned(vlm):
    model, data, emb = vlm
    full = prefill_logits(model, emb)
    with torch.no_grad():
        ref = model(data.images, data.questions()[:, :int(data.q_len[0])]).logits[:, -1]
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    with drop_visual_tokens(model, torch.arange(model.cfg.n_vis).expand(len(data), -1), model.cfg.prune_layer):
        assert torch.equal(prefill_logits(model, emb), full)     # 100 % of the budget: the unpruned output exactly
    assert torch.equal(first_answer(data), data.text[torch.arange(len(data)), data.q_len])


def test_counts_are_the_closed_form(vlm):
    model, _, emb = vlm
    lc = model.lm.config
    shape = SimpleNamespace(hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size, num_heads=lc.num_attention_heads,
                            num_kv_heads=lc.num_key_value_heads, num_layers=lc.num_hidden_layers, vocab_size=lc.vocab_size)
    T, n = emb.shape[1], model.cfg.n_vis
    for K, k in ((0, 0), (2, 3), (5, 36)):
        with drop_visual_tokens(model, torch.arange(k)[None], K):
            assert count_flops(lambda: prefill_logits(model, emb[:1])).total == prefill_flops_formula(shape, T, T - n + k, K)


def test_early_exit_agrees_with_the_rule_and_the_model(vlm):
    model, _, emb = vlm
    L = model.cfg.num_layers
    probs = exit_probabilities(model, emb)
    torch.testing.assert_close(probs[-1], prefill_logits(model, emb).softmax(-1), atol=1e-5, rtol=1e-4)
    logits, exits = early_exit(model, emb, forced_thresholds(L - 1, L))
    assert exits.tolist() == [L - 1] * len(emb)
    torch.testing.assert_close(logits, prefill_logits(model, emb), atol=1e-5, rtol=1e-4)
    deltas = consistency_deltas(probs)
    # the exit statistic by hand: rms over the vocabulary of consecutive exits' distributions
    torch.testing.assert_close(deltas[2], (probs[3] - probs[2]).pow(2).mean(-1).sqrt())
    th = np.append(deltas[:-1].double().median(1).values.numpy() * 0.999, np.inf)
    logits, exits = early_exit(model, emb, th)
    assert (exits.numpy() == simulate_exits(deltas.numpy(), th)).all()
    torch.testing.assert_close(logits.softmax(-1), probs[exits + 1, torch.arange(len(emb))], atol=1e-5, rtol=1e-4)


def test_exit_and_prompt_inputs_are_checked(vlm):
    model, _, emb = vlm
    with pytest.raises(ValueError, match="thresholds"):
        early_exit(model, emb, np.zeros(2))
    with pytest.raises(ValueError, match="exit must be"):
        forced_thresholds(6, 6)
    with pytest.raises(ValueError, match="one length"):
        prompt_embeds(model, book_qa(4, seed=1, kinds=("colour", "count")))


def test_run_counted_and_recognised():
    lin = torch.nn.Linear(5, 3, bias=False)
    out, macs = run_counted(lambda: lin(torch.ones(4, 5)))
    assert macs == 4 * 5 * 3 and out.shape == (4, 3)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8)
    assert recognised(x, y).mean() == pytest.approx(sample_quality(x, y, x)["class_acc"])
