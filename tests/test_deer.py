"Tests of the DeeR-VLA chapter (paperlab.deer): the exit rule, the budget solver against the official outputs (float32 thresholds), the first exit's reference, caps, replay, and the controls (random exits, the compute reduction's floor, the quality floor)."
import json

import numpy as np
import pytest
import torch

from paperlab.core import count_params, repo_root
from paperlab.deer import (ChainEnv, FlamingoLLM, FlamingoLLMConfig, MultiExitPolicy, PolicyConfig, TaskConfig, Vocab,
                           dynamic_step, exit_blocks, exit_profile, exit_statistics, first_reference, heads_loss, learnt_task,
                           reduction_at, rms_delta, rollout, simulate_exits, solve_thresholds, thresholds_for_budget, truncate)

GOLDEN = repo_root() / "data" / "deer" / "golden"


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return MultiExitPolicy(PolicyConfig()).eval()


@pytest.fixture(scope="module")
def batch(policy):
    obs = ChainEnv(TaskConfig(), batch=6, seed=9).observe()
    ids, mask = policy.tokenize(obs["instruction"])
    state = tuple(torch.randn(2, 6, 64) * 0.5 for _ in range(2))
    return obs["tokens"], ids, mask, state


def test_zero_thresholds_force_deepest_allowed_exit_and_infinite_the_first(policy, batch):
    E = len(policy.exits)
    for cap in range(E):
        ex0 = dynamic_step(policy, *batch, np.zeros(E), max_exit=cap)[2]
        exinf = dynamic_step(policy, *batch, np.full(E, np.inf), max_exit=cap)[2]
        assert ex0.tolist() == [cap] * 6 and exinf.tolist() == [0] * 6


def test_exit_at_last_equals_static_model(policy, batch):
    tokens, ids, mask, state = batch
    arm = dynamic_step(policy, tokens, ids, mask, state, np.zeros(len(policy.exits)))[0]
    with torch.no_grad():
        ctx, got = policy.embed(tokens, ids, mask), {}
        hook = policy.layers[-1].register_forward_hook(lambda m, a, out: got.update(h=out[0] if isinstance(out, tuple) else out))
        policy.lm.model(inputs_embeds=ctx["h"], attention_mask=ctx["keep"].long())   # transformers' own static forward
        hook.remove()
        ref = policy.head(MultiExitPolicy.pool(got["h"], ctx["keep"])[:, None], state)[0][:, 0]
    torch.testing.assert_close(arm, ref, atol=1e-5, rtol=0)


def test_golden_official_threshold_solver():
    golden = json.loads((GOLDEN / "thresholds.json").read_text())
    vals = np.load(GOLDEN / "values.npz")
    assert len(golden["cases"]) == 9
    for c in golden["cases"]:
        ml = min(c["max_layer"] - 1, c["exit_ids"][-1])
        K = sum(x <= ml for x in c["exit_ids"])
        ours = solve_thresholds(vals[c["values"]], c["exit_ratio"], K, skip_first="mpt_9b" in c["model_name"]).astype(np.float64)
        ref = np.array(c["thresholds"])
        ref = np.where(ref >= 1e8, np.inf, np.where(ref <= -1e8, -np.inf, ref))
        np.testing.assert_array_equal(ours, ref, err_msg=c["name"])
        # sensitivity: a slightly different q changes the thresholds, so the comparison can fail
        if c["name"] == "deer_b_q1.0":
            assert not np.array_equal(solve_thresholds(vals[c["values"]], 1.05, K), ours)


def _sentinels(t) -> np.ndarray:
    "The official ±1e8 thresholds as ±inf."
    t = np.asarray(t, dtype=np.float64)
    return np.where(t >= 1e8, np.inf, np.where(t <= -1e8, -np.inf, t))


def test_golden_official_thresholds_are_float32_on_float64_statistics():
    # value_net.py:213 stores thresholds in a float32 torch.Tensor; the golden file is that code run on float64 values
    golden = json.loads((GOLDEN / "thresholds_float64.json").read_text())
    vals = np.load(GOLDEN / "values_float64.npz")
    assert len(golden["cases"]) == 40
    changed = 0
    for c in golden["cases"]:
        v, ref = vals[c["values"]], _sentinels(c["thresholds"])
        assert v.dtype == np.float64
        ours = solve_thresholds(v, c["exit_ratio"])
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours.astype(np.float64), ref, err_msg=c["name"])
        np.testing.assert_array_equal(simulate_exits(v, ours), simulate_exits(v, ref))
        exact = solve_thresholds(v, c["exit_ratio"], dtype=torch.float64)   # the option: unrounded thresholds
        changed += not np.array_equal(simulate_exits(v, exact), simulate_exits(v, ref))
    assert changed >= 30, changed   # 38 of 40 cases: the rounding moves some step to another exit, so the test can fail
    th, _ = thresholds_for_budget(vals["c0"], 5.0, [2, 4, 6, 8, 10, 12])
    assert th.dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        solve_thresholds(vals["c0"], 1.0, dtype=torch.float16)


def _two_step_windows(policy, n=5, seed=3):
    "Windows of W = 2 steps (the statistics score step 0 only, with no history): tokens of two consecutive steps of n scenes."
    env = ChainEnv(TaskConfig(), batch=n, seed=seed)
    t0 = env.tokens()
    env.step(*env.expert())
    ids, mask = policy.tokenize(env.instructions())
    return dict(tokens=torch.stack([t0, env.tokens()], 1), ids=ids, mask=mask, arm=torch.zeros(n, 2, 2),
                valid=torch.ones(n, 2, dtype=torch.bool))


def test_statistics_compare_the_first_exit_with_block_0():
    # value_net.py:136: statistics take feats[0], block 0's output; inference (:125) takes the block before the first exit
    torch.manual_seed(1)
    pol = MultiExitPolicy(PolicyConfig(num_layers=6, exit_interval=3), aux_heads=False).eval()
    assert pol.exits == [2, 5] and first_reference(pol.exits, "layer0") == 0 and first_reference(pol.exits, "previous_block") == 1
    data = _two_step_windows(pol)
    got = exit_statistics(pol, data)
    with torch.no_grad():   # by hand: transformers' own forward, every block's output caught by hooks, pooled, decoded
        obs, ids, mask = data["tokens"][:, 0], data["ids"], data["mask"]
        ctx, outs = pol.embed(obs, ids, mask), {}
        hooks = [layer.register_forward_hook(lambda m, a, out, j=j: outs.update({j: out[0] if isinstance(out, tuple) else out}))
                 for j, layer in enumerate(pol.layers)]
        pol.lm.model(inputs_embeds=ctx["h"], attention_mask=ctx["keep"].long())
        for h in hooks: h.remove()
        act = {j: pol.head(MultiExitPolicy.pool(outs[j], ctx["keep"])[:, None])[0][:, 0] for j in outs}
    np.testing.assert_allclose(got[0], rms_delta(act[2], act[0]).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[1], rms_delta(act[5], act[2]).numpy(), rtol=1e-5, atol=1e-7)
    # the option follows inference (block 1); here the two differ, so the comparison above can fail
    other = exit_statistics(pol, data, reference="previous_block")
    np.testing.assert_allclose(other[0], rms_delta(act[2], act[1]).numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(other[0] - got[0]).max() > 1e-3
    # at the chapter's interval of 2 both references are block 0
    pol2 = MultiExitPolicy(PolicyConfig(num_layers=4, exit_interval=2), aux_heads=False).eval()
    np.testing.assert_array_equal(exit_statistics(pol2, data), exit_statistics(pol2, data, reference="previous_block"))
    with pytest.raises(ValueError, match="exit_interval=1"):
        exit_statistics(MultiExitPolicy(PolicyConfig(num_layers=2, exit_interval=1), aux_heads=False), data)
    with pytest.raises(ValueError, match="unknown reference"):
        exit_statistics(pol2, data, reference="block0")


def test_offline_solver_meets_average_budget_on_its_data():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 0.02, size=(4, 2000)) * np.array([1.5, 1.0, 0.6, 0.3])[:, None]
    costs = [2, 4, 6, 8]
    for budget in (2.2, 3.0, 4.5, 6.0, 7.5):
        th, q = thresholds_for_budget(values, budget, costs)
        realised = np.asarray(costs)[simulate_exits(values, th)].mean()
        assert abs(realised - budget) <= 0.03 * budget, (budget, realised)
        np.testing.assert_allclose((exit_profile(q, 4).numpy() * np.array(costs)).sum(), budget, rtol=1e-4)


def test_impossible_budget_raises():
    with pytest.raises(ValueError, match="below the cost of the first allowed exit"):
        thresholds_for_budget(np.ones((4, 10)), 1.9, [2, 4, 6, 8])
    with pytest.raises(ValueError, match="increasing"):
        thresholds_for_budget(np.ones((4, 10)), 3.0, [4, 2, 6, 8])


def test_cap_is_never_exceeded_and_truncation_loads_only_the_cap(policy):
    r = rollout(policy, TaskConfig(), 4, 1, np.zeros(4), max_exit=1)
    assert r["max_layers"] <= 4 and r["exits"].max() <= 1
    small = truncate(policy, 1)
    assert len(small.layers) == 4 and small.exits == [1, 3]
    assert count_params(small.lm.model.layers) * 2 == count_params(policy.lm.model.layers)
    with pytest.raises(ValueError, match="max_exit"):
        obs = ChainEnv(TaskConfig(), batch=1).observe()
        dynamic_step(small, obs["tokens"], *small.tokenize(obs["instruction"]), None, [0, 0], max_exit=2)


def test_episodes_replay_identically_from_a_seed(policy):
    a = rollout(policy, TaskConfig(), 3, 7, [0.01, 0.01, 0.01, np.inf])
    b = rollout(policy, TaskConfig(), 3, 7, [0.01, 0.01, 0.01, np.inf])
    np.testing.assert_array_equal(a["exits"], b["exits"])
    np.testing.assert_array_equal(a["completed"], b["completed"])


def test_bad_inputs_raise(policy):
    with pytest.raises(ValueError, match="unknown variant"):
        heads_loss(policy, torch.zeros(4, 1, 2, 32), dict(arm=torch.zeros(1, 2, 2)), "early")
    with pytest.raises(ValueError, match="positive finite"):
        exit_profile(-1.0, 4)
    with pytest.raises(ValueError, match="unknown words"):
        Vocab().encode("go to the purple square")
    with pytest.raises(ValueError, match="batch must be"):
        ChainEnv(TaskConfig(), batch=0)
    with pytest.raises(ValueError, match="exit_interval"):
        exit_blocks(8, 0)


def test_full_size_counts_on_meta():
    assert exit_blocks(12, 2) == [1, 3, 5, 7, 9, 11]      # DeeR-B: 6 exits (README)
    with torch.device("meta"):
        m = FlamingoLLM(FlamingoLLMConfig(), layers=12)
    assert len(m.mpt.blocks) == 12
    assert count_params(m.mpt.blocks[0]) == 12 * 2048 ** 2 + 2 * 2048   # MPT-1B block: 12 d^2 weights + 2 LayerNorm weights


def test_forced_exits_give_each_scene_its_own_exits_action(policy, batch):
    # the random-exit control: scene b leaves at exit forced[b]; reference from transformers' own forward, every block hooked
    tokens, ids, mask, state = batch
    forced = torch.tensor([0, 1, 2, 3, 1, 0])
    arm, _, ex, _ = dynamic_step(policy, tokens, ids, mask, state, np.zeros(4), forced=forced)
    with torch.no_grad():
        ctx, outs = policy.embed(tokens, ids, mask), {}
        hooks = [layer.register_forward_hook(lambda m, a, out, j=j: outs.update({j: out[0] if isinstance(out, tuple) else out}))
                 for j, layer in enumerate(policy.layers)]
        policy.lm.model(inputs_embeds=ctx["h"], attention_mask=ctx["keep"].long())
        for h in hooks: h.remove()
        ref = torch.stack([policy.head(MultiExitPolicy.pool(outs[policy.exits[k]], ctx["keep"])[b:b + 1, None],
                                       tuple(s[:, b:b + 1] for s in state))[0][0, 0] for b, k in enumerate(forced.tolist())])
    assert ex.tolist() == forced.tolist()
    torch.testing.assert_close(arm, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="forced must be"):
        dynamic_step(policy, tokens, ids, mask, state, np.zeros(4), max_exit=1, forced=forced)     # exit 3 beyond the cap
    with pytest.raises(ValueError, match="forced must be"):
        dynamic_step(policy, tokens, ids, mask, state, np.zeros(4), forced=forced.float())


def test_random_exit_rollout_draws_its_shares(policy):
    for j in range(4):   # all the share on exit j: every step runs exactly exits[j] + 1 blocks
        r = rollout(policy, TaskConfig(), 3, 2, np.zeros(4), exit_probs=np.eye(4)[j])
        assert set(r["exits"].tolist()) == {j} and r["avg_layers"] == policy.exits[j] + 1
    a = rollout(policy, TaskConfig(), 8, 2, np.zeros(4), exit_probs=[0.5, 0, 0, 0.5], exit_seed=3)
    b = rollout(policy, TaskConfig(), 8, 2, np.zeros(4), exit_probs=[0.5, 0, 0, 0.5], exit_seed=3)
    np.testing.assert_array_equal(a["exits"], b["exits"])                  # seeded: replays exactly
    n = len(a["exits"])
    assert set(a["exits"].tolist()) <= {0, 3} and abs((a["exits"] == 3).mean() - 0.5) < 4 * 0.5 / np.sqrt(n)   # binomial, 4 sd
    for bad in ([0.5, 0.5, 0.5, 0.0], [0.5, 0.5], [1.5, -0.5, 0, 0]):
        with pytest.raises(ValueError, match="exit_probs must be"):
            rollout(policy, TaskConfig(), 2, 0, np.zeros(4), exit_probs=bad)


def test_reduction_at_hand_worked_and_untrained_gets_none():
    pts = [(3.2, 1.0), (2.5, 0.5), (4.4, 1.6), (6.1, 1.7)]
    assert reduction_at(pts, 0.8, 8.0, 2.0) == pytest.approx(8.0 / (2.5 + 0.6 * 0.7))    # between 2.5 and 3.2 layers
    assert reduction_at(pts, 1.65, 8.0, 2.0) == pytest.approx(8.0 / (4.4 + 0.5 * 1.7))   # between 4.4 and 6.1 layers
    assert reduction_at(pts, 0.2, 8.0, 2.0) == pytest.approx(8.0 / 2.5)                  # the cheapest point already
    assert reduction_at([(1.5, 0.9)], 0.5, 8.0, 2.0) == pytest.approx(4.0)               # cost floored at the first exit's
    assert reduction_at(pts, 1.8, 8.0, 2.0) == 1.0                                       # never reached
    # two untrained policies: every success 0. Without the floor the curve "reaches" the baseline at its cheapest point;
    # with the untrained policy's success as the floor there is no reduction
    dead = [(2.3, 0.0), (3.0, 0.0), (4.1, 0.0)]
    assert reduction_at(dead, 0.0, 8.0, 2.0) == pytest.approx(8.0 / 2.3)
    assert reduction_at(dead, 0.0, 8.0, 2.0, floor=0.0) == 1.0
    assert reduction_at(pts, 0.8, 8.0, 2.0, floor=0.79) > 1.0                            # a baseline above the floor counts
    with pytest.raises(ValueError, match="points must be"):
        reduction_at([1.0, 2.0], 0.5, 8.0, 2.0)
    with pytest.raises(ValueError, match="min_cost"):
        reduction_at(pts, 0.5, 8.0, 0.0)


def _wilson(k, n, z=1.959963984540054):
    "The Wilson score interval written out (Wilson 1927), independent of paperlab.ledger."
    p = k / n
    c, h = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def test_quality_floor_is_wilson_intervals_apart():
    n, k0 = 80, 2
    upper0 = _wilson(k0, n)[1]
    k_min = next(k for k in range(n + 1) if _wilson(k, n)[0] > upper0)   # the fewest first instructions that clear the floor
    assert 8 <= k_min <= 20
    assert learnt_task(k_min, n, k0, n) and not learnt_task(k_min - 1, n, k0, n)
    assert not learnt_task(k0 + 1, n, k0, n)       # more than the untrained policy, but not outside its interval
    with pytest.raises(ValueError, match="wilson_interval"):
        learnt_task(90, 80, 0, 80)
