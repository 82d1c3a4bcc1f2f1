"""Attention Mediators chapter: golden outputs of the official code, full-size configs against the official counts, linear cost, the switching sampler, bad inputs."""
import json

import numpy as np
import pytest
import torch

from paperlab.attention import mediator_attention
from paperlab.core import count_flops, repo_root
from paperlab.diffusion import DiT, sde_sample, tiny_dit_config
from paperlab.mediators import (GaussianToyField, MediatorAttention, dynamic_sample, jsd_score, mediator_grid, model_cost,
                                paper_numbers, step_distance, switch_steps)

COUNTED = paper_numbers()["counted"]
GOLDEN = repo_root() / "data" / "mediators" / "golden"
# official parameter names -> paperlab's (data/mediators/golden/README.md)
NAME_MAP = {"an_bias": "bias_mk_coarse", "na_bias": "bias_qm_coarse", "ah_bias": "bias_mk_row", "aw_bias": "bias_mk_col",
            "ha_bias": "bias_qm_row", "wa_bias": "bias_qm_col"}


def golden_attention():
    "paperlab's MediatorAttention with the golden recipe's weights, the golden input, and the official outputs."
    meta = json.loads((GOLDEN / "mediator_attention_s2_m16.json").read_text())
    g = torch.Generator().manual_seed(meta["seed"])
    params = {n: torch.randn(s, generator=g, dtype=torch.float64) * (0.5 if n.endswith("_bias") else 0.05)
              for n, s in zip(meta["names"], meta["shapes"])}
    x = torch.randn(meta["input_shape"], generator=g, dtype=torch.float64)
    assert np.allclose([float(p.sum()) for p in params.values()], meta["param_sums"], rtol=0, atol=1e-9), "torch's generator changed"
    ma = MediatorAttention(384, 6, latent_side=16, num_mediators=16).double().eval()
    sd = ma.state_dict()
    ma.load_state_dict({NAME_MAP.get(n, n): p.reshape(sd[NAME_MAP.get(n, n)].shape) for n, p in params.items()})
    ref = np.stack([np.load(GOLDEN / "mediator_attention_s2_m16.npz")["out0"], np.load(GOLDEN / "mediator_attention_s2_m16_b1.npz")["out1"]])
    return ma, x, torch.from_numpy(ref)


def test_mediator_attention_equals_the_official_module():
    ma, x, ref = golden_attention()
    with torch.no_grad():
        err = (ma(x) - ref).abs().max().item()
    assert err < 1e-12, err


def test_golden_attention_test_can_fail():
    ma, x, ref = golden_attention()
    with torch.no_grad():
        ma.bias_qm_row[0, 3, 0, 5] += 1e-3            # one position bias of one head, one mediator
        err = (ma(x) - ref).abs().max().item()
    assert err > 1e-7, err


def golden_switching():
    z = np.load(GOLDEN / "switching_sde_toy.npz")
    fields = [GaussianToyField(torch.from_numpy(z["mu"]), s) for s in z["stds"].tolist()]
    runs = {}
    for key in [k[:-len("_calls")] for k in z.files if k.endswith("_calls")]:
        r1, r2, dist = key.split("_")
        runs[key] = ([float(r1[1:]), float(r2)], dist, z[key + "_calls"], z[key + "_final"])
    return fields, runs


@pytest.mark.parametrize("key", sorted(golden_switching()[1]))
def test_switching_sde_equals_the_official_loop(key):
    fields, runs = golden_switching()
    ratios, dist, calls, final = runs[key]
    x, used = dynamic_sample(fields, ratios, torch.zeros(4, dtype=torch.long), steps=250, sampler="sde", per="batch",
                             distance=dist, generator=torch.Generator().manual_seed(11))
    # the official drift calls the model twice per step (velocity and score), with the same model
    assert (calls[::2] == calls[1::2]).all()
    assert (used == used[:, :1]).all()                          # one decision per batch
    assert (used[:, 0].numpy() == calls[::2]).all()
    assert np.abs(x.numpy() - final).max() < 1e-12


def test_golden_switching_test_can_fail():
    fields, runs = golden_switching()
    ratios, dist, calls, final = runs["r0.7_0.5_mae"]
    fields[1].std += 1e-6                                       # the second model, slightly changed
    x, used = dynamic_sample(fields, ratios, torch.zeros(4, dtype=torch.long), steps=250, distance=dist,
                             generator=torch.Generator().manual_seed(11))
    assert np.abs(x.numpy() - final).max() > 1e-9


def test_no_switch_equals_the_single_model_sde_sampler():
    mu = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fields = [GaussianToyField(mu, 0.3), GaussianToyField(mu, 0.9)]
    y = torch.zeros(3, dtype=torch.long)
    x, used = dynamic_sample(fields, [0.0], y, steps=20, generator=torch.Generator().manual_seed(1))
    ref = sde_sample(fields[0], y, steps=20, generator=torch.Generator().manual_seed(1))
    assert int(used.sum()) == 0 and torch.equal(x, ref)


def test_per_sample_switching_is_the_batch_rule_on_each_sample_alone():
    # the official README samples with --per_proc_batch_size 1: there the batch rule is a per-sample rule
    mu = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fields = [GaussianToyField(mu, 0.2), GaussianToyField(mu, 0.4)]
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.3, 3.0]).double()[:, None, None, None]
    y = torch.zeros(2, dtype=torch.long)
    kw = dict(steps=40, sampler="ode", x_init=x0)
    x_s, used_s = dynamic_sample(fields, [0.9], y, per="sample", **kw)
    for i in range(2):
        x_i, used_i = dynamic_sample(fields, [0.9], y[:1], per="batch", **{**kw, "x_init": x0[i:i + 1]})
        assert torch.equal(used_s[:, i], used_i[:, 0])
        torch.testing.assert_close(x_s[i], x_i[0], rtol=0, atol=1e-12)
    _, used_b = dynamic_sample(fields, [0.9], y, per="batch", **kw)
    assert (used_b == used_b[:, :1]).all()
    assert not torch.equal(used_s[:, 0], used_s[:, 1])          # the two samples switch at different steps
    a = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)); b = torch.zeros(2, 3, 4)
    torch.testing.assert_close(step_distance(a, b, "mae", "sample"), a.abs().flatten(1).mean(1))
    torch.testing.assert_close(step_distance(a, b, "mse", "batch"), (a ** 2).mean())
    assert switch_steps(used_s, 2, 0) == [None] and switch_steps(used_s, 2, 1) == [int((used_s[:, 1] >= 1).nonzero()[0, 0])]


def test_jsd_score_closed_forms():
    n = 5
    same = torch.full((2, n, n), 1 / n)
    assert jsd_score(same).item() == pytest.approx(0.0, abs=1e-6)
    assert jsd_score(torch.eye(n)[None]).item() == pytest.approx(1.0, abs=1e-6)   # disjoint rows: 1 bit per pair
    # two heads, three rows: head 0 all alike, head 1 identity -> mean over heads of (0, 1) = 0.5
    both = torch.stack([torch.full((3, 3), 1 / 3), torch.eye(3)])
    assert jsd_score(both).item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="heads, N, N"):
        jsd_score(torch.rand(3, 4))


@pytest.mark.parametrize("name,m", [(n, int(m)) for n, by_m in COUNTED.items() for m in by_m])
def test_full_size_config_matches_official_code(name, m):
    # official code built with random weights (issue 4), e.g. SiT-XL/2 with 4 mediators: 675.74M, 114.60 G
    ours, official = model_cost(name, m), COUNTED[name][str(m)]
    assert abs(ours["params_M"] / official["params_M"] - 1) < 0.01
    assert abs(ours["flops_G"] / official["flops_G"] - 1) < 0.05


def test_module_flops_are_linear_in_tokens_for_fixed_m():
    flops = {}
    for side in (16, 32, 64):
        mod = MediatorAttention(64, 4, latent_side=side, num_mediators=16)
        flops[side] = count_flops(mod, torch.randn(1, side * side, 64)).total
    assert flops[32] == 4 * flops[16] and flops[64] == 4 * flops[32]


def test_implied_weights_work_without_the_notebook():
    # issue 9 §1: this raised NameError when the import lived only in a notebook cell
    w = MediatorAttention(32, 2, latent_side=4, num_mediators=4).implied_weights(torch.randn(1, 16, 32))
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 16))


@pytest.mark.parametrize("m", [0, 2, 8, 15, -4])
def test_m_must_be_a_perfect_square(m):
    with pytest.raises(ValueError, match="perfect square"):
        mediator_grid(m)


def test_mismatched_shapes_are_clear_errors():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="mediators must be"):
        mediator_attention(q, q, q, torch.randn(1, 3, 4, 8))
    with pytest.raises(ValueError, match="token count"):
        mediator_attention(q, q, torch.randn(1, 2, 15, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="grid"):
        MediatorAttention(32, 2, latent_side=4, num_mediators=4)(torch.randn(1, 20, 32))
    with pytest.raises(ValueError, match="mu must be"):
        GaussianToyField(torch.zeros(4, 4), 0.5)


def test_dynamic_sampler_rejects_bad_settings():
    models = [DiT(tiny_dit_config(depth=1)), DiT(tiny_dit_config(depth=1))]
    y = torch.arange(2)
    with pytest.raises(ValueError, match="one switch ratio per switch"):
        dynamic_sample(models, [], y, steps=5)
    with pytest.raises(ValueError, match=">= 0"):
        dynamic_sample(models, [-0.5], y, steps=5)
    with pytest.raises(ValueError, match="first_several"):
        dynamic_sample(models, [0.5], y, steps=4, first_several=3)          # SDE: 3 watched steps
    with pytest.raises(ValueError, match="sampler must be"):
        dynamic_sample(models, [0.5], y, steps=5, sampler="heun")
    with pytest.raises(ValueError, match="per must be"):
        dynamic_sample(models, [0.5], y, steps=5, per="token")
    with pytest.raises(ValueError, match="distance must be"):
        dynamic_sample(models, [0.5], y, steps=5, distance="l3")


def test_both_softmax_steps_are_row_stochastic_and_compose_to_the_implied_matrix():
    from paperlab.attention import mediator_attention_weights, mediator_weights_pair
    g = torch.Generator().manual_seed(0)
    q, k, m = torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    w_qm, w_mk = mediator_weights_pair(q, k, m)
    torch.testing.assert_close(w_qm.sum(-1), torch.ones(2, 3, 20))
    torch.testing.assert_close(w_mk.sum(-1), torch.ones(2, 3, 4))
    # naive: explicit exponentials and normalisation, then the product
    e_qm = torch.exp(q @ m.transpose(-2, -1) / 8 ** 0.5); e_mk = torch.exp(m @ k.transpose(-2, -1) / 8 ** 0.5)
    naive = (e_qm / e_qm.sum(-1, keepdim=True)) @ (e_mk / e_mk.sum(-1, keepdim=True))
    torch.testing.assert_close(mediator_attention_weights(q, k, m), naive)


def test_token_mixing_equals_the_implied_matrix_with_pooled_mediators():
    from paperlab.attention import mediator_attention_weights
    from paperlab.mediators import mediator_token_mixing
    q, k, v = torch.randn(3, 2, 3, 64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).unbind(0)
    # mediators by hand: the mean of the queries of each 4×4 cell of the 8×8 grid (M = 4)
    grid = q.reshape(2, 3, 8, 8, 8)
    m = torch.stack([grid[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean((2, 3)) for i in range(2) for j in range(2)], 2)
    torch.testing.assert_close(mediator_token_mixing(q, k, v, 4), mediator_attention_weights(q, k, m) @ v, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="square token grid"):
        mediator_token_mixing(q[:, :, :60], k[:, :, :60], v[:, :, :60], 4)
    with pytest.raises(ValueError, match="perfect square"):
        mediator_token_mixing(q, k, v, 8)


def test_experiment_helpers_reject_bad_settings():
    from paperlab.mediators import attention_along_sampling, run_jobs, toy_mediator_dit
    with pytest.raises(ValueError, match="workers"):
        run_jobs([], workers=0)
    with pytest.raises(ValueError, match="sampler must be"):
        attention_along_sampling(toy_mediator_dit(None, depth=1), torch.arange(2), steps=3, sampler="heun")


def test_attention_along_sampling_records_every_sde_step():
    from paperlab.mediators import attention_along_sampling, toy_mediator_dit
    torch.manual_seed(0)
    model = toy_mediator_dit(4, depth=2).eval()
    traj = attention_along_sampling(model, torch.arange(2), steps=5)
    assert len(traj) == 5 and len(traj[0]) == 2                 # 4 stochastic steps + the final mean step; 2 blocks
    torch.testing.assert_close(traj[0][0].sum(-1), torch.ones(2, 4, 64))


def test_pairwise_jsd_equals_a_naive_loop():
    from paperlab.mediators import pairwise_jsd
    # JSD(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2, in bits, one pair at a time (the fast form uses entropies)
    a = (2 * torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).softmax(-1)
    a[0, 1] = a[0, 4]                                            # two identical rows: JSD exactly 0
    naive = torch.zeros(2, 6, 6, dtype=torch.float64)
    for h in range(2):
        for i in range(6):
            for j in range(6):
                p, q = a[h, i], a[h, j]
                m = (p + q) / 2
                naive[h, i, j] = 0.5 * (p * (p / m).log2()).sum() + 0.5 * (q * (q / m).log2()).sum()
    torch.testing.assert_close(pairwise_jsd(a), naive, rtol=0, atol=1e-12)
    assert pairwise_jsd(a)[0, 1, 4].item() == 0.0


def _wilson_lower(k: int, n: int, z: float = 1.959963984540054) -> float:
    "Wilson score interval's lower end, written out (95%)."
    p = k / n
    return (p + z * z / (2 * n) - z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)


def test_learned_the_data_is_the_wilson_lower_end_above_twice_chance():
    from paperlab.mediators import learned_the_data
    n = 300                                                      # e.g. 3 seeds × 100 samples
    first = next(k for k in range(n + 1) if _wilson_lower(k, n) > 0.2)
    assert 0.2 < first / n < 0.3
    assert learned_the_data("a", first, n) == (learned_the_data("a", first, n)[0], True)
    assert learned_the_data("a", first - 1, n)[1] is False
    # the arms of issue 22's full run: class accuracy 0.09-0.14 over 3 × 160 samples, i.e. at chance: they must fail
    for acc in (0.09, 0.14):
        assert learned_the_data("softmax", round(acc * 480), 480)[1] is False
    text, _ = learned_the_data("the softmax arm", 150, 300)
    assert "0.500" in text and "2× chance (0.20)" in text and f"{_wilson_lower(150, 300):.3f}" in text
    # another floor: three times chance of 4 classes
    assert learned_the_data("a", 240, 300, chance=0.25, factor=3.0)[1] is (_wilson_lower(240, 300) > 0.75)


@pytest.mark.parametrize("kw,match", [(dict(correct=11, total=10), "0 <= correct <= total"),
                                      (dict(correct=0, total=0), "total > 0"),
                                      (dict(correct=2.5, total=10), "whole numbers"),
                                      (dict(correct=5, total=10, chance=0.0), "chance must be in"),
                                      (dict(correct=5, total=10, chance=0.6), "factor·chance < 1"),
                                      (dict(correct=5, total=10, factor=-1.0), "factor must be > 0")])
def test_learned_the_data_rejects_bad_counts(kw, match):
    from paperlab.mediators import learned_the_data
    with pytest.raises(ValueError, match=match):
        learned_the_data("a", **kw)


def test_run_arm_controls_use_the_untrained_model_and_leave_training_unchanged():
    from paperlab.core import deterministic
    from paperlab.diffusion import digits_for_diffusion, train_flow
    from paperlab.mediators import redundancy_along_sampling, run_arm, toy_mediator_dit
    train = dict(depth=1, hidden=32, steps=3, batch_size=4, lr=1e-3, n_samples=10, sample_steps=4, probes=2)
    out = run_arm(None, 5, train)
    # the redundancy control is the same model at its initial weights
    deterministic(threads=1, seed=5)
    untrained = toy_mediator_dit(None, 1, 32)
    torch.testing.assert_close(out["redundancy_init"], redundancy_along_sampling(untrained, 2, 4, 5), rtol=0, atol=0)
    assert not torch.allclose(out["redundancy"], out["redundancy_init"])
    # measuring the control does not change the training: the same weights as a run without it
    deterministic(threads=1, seed=5)
    model = toy_mediator_dit(None, 1, 32)
    xd, yd = digits_for_diffusion("train")
    train_flow(model, xd, yd, steps=3, batch_size=4, lr=1e-3, seed=5, progress=False)
    assert all(torch.equal(out["state"][k], v) for k, v in model.state_dict().items())
    # the quality null: the same model, other noise; class counts for the precondition
    assert out["fd_resample"] != out["fd"]
    assert out["n_samples"] == 10 and out["class_k"] == round(out["class_acc"] * 10)
    assert "redundancy_init" not in run_arm(4, 5, train)
