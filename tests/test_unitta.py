"""UniTTA chapter: matrices against closed forms, the sampler's properties and bad inputs, BDN and COFA against independent computations, the CIFAR-10-C loader on generated files."""
import numpy as np
import pytest
import torch
from torch import nn

from paperlab.unitta import (BDN2d, CORRUPTIONS, SmallCNN, Source, BNAdapt, UniTTA, balanced_stats, cat_avg_accuracy, cofa,
                             compatible, correlation_factors, corrupt, joint_transition_matrix, load_corruptions,
                             marginals, paper_numbers, ratio_list, run_stream, sample_stream, scenario,
                             self_transition_rates, stationary_distribution, transition_matrix, unitta_scenarios,
                             update_class_stats, update_class_stats_ref, visit_order, w2_distance, write_corruptions)

NUMBERS = paper_numbers()


def power_stationary(T, steps=20000):
    "Stationary distribution by power iteration (independent of the eigen-solver)."
    p = np.full(len(T), 1 / len(T))
    for _ in range(steps): p = p @ T
    return p


def labels(D, K, per_state):
    s = np.repeat(np.arange(D * K), per_state)
    return s // K, s % K


@pytest.mark.parametrize("K,c,rho", [(10, 0.95, 10), (15, 0.85, 5), (6, 0.85, 5), (10, 0.6, 2), (15, 1 / 15, 1), (3, 0.9, 4)])
def test_stationary_distribution_is_the_geometric_target(K, c, rho):
    T = transition_matrix(K, c, rho)
    np.testing.assert_allclose(T.sum(1), 1, atol=1e-12)
    target = rho ** (-np.arange(K) / (K - 1)); target /= target.sum()          # closed form r_k ∝ ρ^(-k/(K-1))
    np.testing.assert_allclose(power_stationary(T, 5000), target, atol=1e-8)
    np.testing.assert_allclose(stationary_distribution(T), target, atol=1e-10)
    assert T[0, 0] == pytest.approx(c) and T[-1, -1] == pytest.approx(1 - rho * (1 - c))


def test_official_factor_values():
    # unittasampler.get_cor_factors(10, 0.95, 10): head 0.95, tail 0.5; 15 domains (0.85, 5): tail 0.25
    f = correlation_factors(10, 0.95, 10)
    assert f[0] == pytest.approx(0.95) and f[-1] == pytest.approx(NUMBERS["compatibility"]["class_noniid_imbalanced_tail_factor"])
    assert correlation_factors(15, 0.85, 5)[-1] == pytest.approx(NUMBERS["compatibility"]["domain_noniid_imbalanced_tail_factor_15_domains"])
    np.testing.assert_allclose(np.diff(np.log(1 - f)), np.log(10) / 9)          # 1 - c_k geometric in k


@pytest.mark.parametrize("K", [2, 6, 10, 15])
def test_iid_balanced_rows_are_uniform(K):
    np.testing.assert_allclose(transition_matrix(K, 1 / K), np.full((K, K), 1 / K), atol=1e-15)


def test_kron_stationary_is_outer_product():
    Td, Tc = transition_matrix(4, 0.85, 5), transition_matrix(5, 0.95, 10)
    T = joint_transition_matrix(Td, Tc)
    assert T[1 * 5 + 2, 3 * 5 + 4] == pytest.approx(Td[1, 3] * Tc[2, 4])          # state = domain·K + class
    np.testing.assert_allclose(power_stationary(T, 20000), np.outer(ratio_list(4, 5), ratio_list(5, 10)).ravel(), atol=1e-6)


@pytest.mark.parametrize("K,c,rho", [(10, 0.1, 10), (15, 0.067, 5), (10, 0.5, 10), (10, 0.05, 1)])
def test_incompatible_correlation_and_imbalance_raise(K, c, rho):
    assert not compatible(K, c, rho)
    with pytest.raises(ValueError, match="incompatible"):
        transition_matrix(K, c, rho)
    np.testing.assert_allclose(transition_matrix(K, c, rho, strict=False).diagonal(), c)


@pytest.mark.parametrize("args,msg", [((0, 0.5, 1), "num_states"), ((5, 1.5, 1), "correlation"), ((5, 0.5, 0.5), "imbalance"),
                                      ((2.5, 0.5, 1), "num_states")])
def test_bad_dimension_arguments(args, msg):
    with pytest.raises(ValueError, match=msg):
        transition_matrix(*args)


def test_joint_matrix_needs_square_inputs():
    with pytest.raises(ValueError, match="square"):
        joint_transition_matrix(np.ones((2, 3)), np.eye(2))


def test_scenarios():
    sc = unitta_scenarios()
    assert len(sc) == NUMBERS["benchmark"]["scenarios"] and sum(s.evaluated for s in sc) == NUMBERS["benchmark"]["evaluated"]
    assert [s.code for s in unitta_scenarios(evaluated_only=True)][:3] == ["i1i1", "i1iu", "i1n1"]   # sh/run.sh order
    s = scenario("iun1", 15, 10)
    assert (s.class_correlation, s.class_imbalance, s.domain_correlation, s.domain_imbalance) == (0.1, 10.0, 0.85, 1.0)


@pytest.mark.parametrize("code", ["xu1u", "nu1", "nu1uu", "n21u", "nuiv", 7])
def test_unknown_scenario_code(code):
    with pytest.raises(ValueError, match="unknown scenario code"):
        scenario(code)


def test_bad_stream_inputs():
    d, k = labels(3, 4, 5)
    sc = scenario("i1i1", 3, 4)
    with pytest.raises(ValueError, match="same length"):
        sample_stream(d, k[:-1], sc, 5)
    with pytest.raises(ValueError, match=r"classes must hold integers in \[0, 4\)"):
        sample_stream(d, k + 1, sc, 5)
    with pytest.raises(ValueError, match="1-D"):
        sample_stream(d[:, None], k, sc, 5)
    with pytest.raises(ValueError, match="max_state_samples"):
        sample_stream(d, k, sc, 0)
    keep = ~((d == 2) & (k == 3))
    with pytest.raises(ValueError, match=r"empty: \[\(2, 3\)\]"):
        sample_stream(d[keep], k[keep], sc, 5)


@pytest.mark.parametrize("code", [s.code for s in unitta_scenarios(4, 5)])
def test_every_scenario_samples_reproducibly(code):
    d, k = labels(4, 5, 6)
    a = sample_stream(d, k, scenario(code, 4, 5), 12, seed=3)
    b = sample_stream(d, k, scenario(code, 4, 5), 12, seed=3)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(d[a.indices], a.domains)
    np.testing.assert_array_equal(a.counts.sum(), len(a))
    if a.quota is None:
        assert a.counts.max() == 12                                    # compatible: stop when a state is full
    elif not a.compatible["domain"] and not a.compatible["class"]:
        np.testing.assert_array_equal(a.counts, a.quota)               # every state uses exactly its quota
    elif not a.compatible["domain"]:
        np.testing.assert_array_equal(a.counts.sum(1), a.quota.sum(1))  # every domain uses exactly its quota
    else:
        np.testing.assert_array_equal(a.counts.sum(0), a.quota.sum(0))
    if a.quota is not None:
        R = np.outer(ratio_list(4, 5 if code[3] == "u" else 1), ratio_list(5, 10 if code[1] == "u" else 1))
        np.testing.assert_array_equal(a.quota, np.round(12 * R / R[0, 0]))   # U = round(M R / R_00), head state = M
    if code[2] == "1":
        assert visit_order(a.domains) == [0, 1, 2, 3]                   # continual domains in order


def test_self_transitions_and_marginals_of_a_long_stream():
    d, k = labels(2, 10, 100)
    st = sample_stream(d, k, scenario("nui1", 2, 10), 3000, seed=0)
    c = correlation_factors(10, 0.95, 10)
    rates = self_transition_rates(st.classes, 10)
    np.testing.assert_allclose(rates, c, atol=0.05)
    m = marginals(st.classes, 10)
    assert 5 < m[0] / m[-1] < 16                                       # ρ = 10 up to slow mixing


def test_corruptions_and_loader(tmp_path):
    x = torch.rand(6, 3, 8, 8); y = torch.arange(6) % 3
    for name in CORRUPTIONS:
        z = corrupt(x, name, 5)
        assert z.shape == x.shape and z.min() >= 0 and z.max() <= 1 and not torch.equal(z, x)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog")
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)
    write_corruptions(tmp_path, x, y, corruptions=["contrast", "brightness"])
    arr = np.load(tmp_path / "contrast.npy")
    assert arr.shape == (30, 8, 8, 3) and arr.dtype == np.uint8      # CIFAR-10-C layout: (5·N, H, W, C)
    ds = load_corruptions(tmp_path, ["brightness", "contrast"], severity=3, n=4)
    xs, ys, dom = ds.tensors
    assert xs.shape == (8, 3, 8, 8) and dom.tolist() == [0] * 4 + [1] * 4 and ys.tolist() == y[:4].tolist() * 2
    np.testing.assert_allclose(xs[4:].numpy(), arr[12:16].transpose(0, 3, 1, 2) / 255, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="fog.npy"):
        load_corruptions(tmp_path, ["fog"])
    with pytest.raises(ValueError, match="n must lie"):
        load_corruptions(tmp_path, ["contrast"], n=7)
    np.save(tmp_path / "contrast.npy", arr[:10])
    with pytest.raises(ValueError, match="must be"):
        load_corruptions(tmp_path, ["contrast"])


@pytest.mark.parametrize("eta", [0.01, 0.1, 0.4, 1.0])
def test_update_matches_loop_reference(eta):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, 3, 3, generator=g)
    grp = torch.randint(0, 6, (20,), generator=g)
    m0, v0 = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g) + 0.1
    for a, b in zip(update_class_stats(m0, v0, x, grp, eta), update_class_stats_ref(m0, v0, x, grp, eta)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bdn_with_one_domain_is_class_balanced_bn():
    # one domain: the normalisation equals BN with class-balanced statistics (mean of class means; law of total variance)
    bn = nn.BatchNorm2d(2).eval()
    bn.weight.data = torch.tensor([1.5, 0.5]); bn.bias.data = torch.tensor([0.1, -0.2])
    layer = BDN2d(bn, num_classes=3, max_domains=1, eta=0.3)
    g = torch.Generator().manual_seed(1)
    lab = torch.tensor([0, 0, 0, 0, 1, 2])
    x = torch.randn(6, 2, 4, 4, generator=g) + lab[:, None, None, None]
    layer.labels, layer.domains, layer.update = lab, torch.zeros(6, dtype=torch.long), True
    out = layer(x)
    mk, vk = update_class_stats_ref(torch.zeros(3, 2), torch.ones(3, 2), x, lab, 0.3)
    mu = mk.mean(0); var = vk.mean(0) + ((mk - mu) ** 2).mean(0)
    ref = nn.functional.batch_norm(x, mu, var, bn.weight, bn.bias, False, 0.0, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_w2_distance_closed_form():
    m, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 1.0]])
    mu, s2 = torch.tensor([[0.0, 2.0], [1.0, 2.0]]), torch.tensor([[1.0, 1.0], [4.0, 1.0]])
    # (1-0)^2 + (2-1)^2 = 2 for domain 0 ((σ1-σ2)^2 = (2-1)^2 on channel 0); 0 for domain 1
    torch.testing.assert_close(w2_distance(m, v, mu, s2), torch.tensor([[2.0, 0.0]]))


def test_balanced_stats_equal_pooled_stats_of_equal_classes():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(30, 3, generator=g) * (k + 1) + 2 * k for k in range(5)]
    mk = torch.stack([a.mean(0) for a in xs]); vk = torch.stack([a.var(0, unbiased=False) for a in xs])
    mu, var = balanced_stats(mk, vk)
    pooled = torch.cat(xs)
    torch.testing.assert_close(mu, pooled.mean(0)); torch.testing.assert_close(var, pooled.var(0, unbiased=False), atol=1e-4, rtol=1e-4)


def test_cofa_keeps_agreeing_predictions():
    fc = nn.Linear(6, 3)
    g = torch.Generator().manual_seed(4)
    f = torch.randn(300, 6, generator=g)
    z = fc(f)
    same = f[z.argmax(1) == 0]
    p, _ = cofa(same, fc)
    assert torch.equal(p.argmax(1), torch.zeros(len(same), dtype=torch.long))   # argmax of an average of agreeing logits
    assert (p.max(1).values >= fc(same).softmax(1).max(1).values - 1e-7).all()
    p_nofilt, _ = cofa(f, fc, filt=False)
    torch.testing.assert_close(p_nofilt[1:], fc((f[1:] + f[:-1]) / 2).softmax(1))


def test_methods_run_and_leave_the_source_model_alone():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d, k = labels(2, 4, 3)
    x = torch.rand(len(d), 1, 8, 8)
    ds = torch.utils.data.TensorDataset(x, torch.as_tensor(k), torch.as_tensor(d))
    st = sample_stream(d, k, scenario("n1n1", 2, 4), 4, seed=0)
    for method in (Source(model), BNAdapt(model), UniTTA(model, 4, eta=0.2), UniTTA(model, 4, bdn=False), UniTTA(model, 4, oracle=True)):
        r = run_stream(method, ds, st, batch_size=5)
        assert 0 <= r["acc"] <= 1 and len(r["pred"]) == len(st)
    for kk, v in model.state_dict().items():
        assert torch.equal(v, before[kk]), kk
    with pytest.raises(ValueError, match="domain_layer"):
        UniTTA(model, 4, domain_layer=3)


def test_cat_avg_accuracy_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        cat_avg_accuracy(np.zeros(3), np.zeros(4), np.zeros(3))


def test_continual_orders():
    d, k = labels(3, 4, 5)
    s = sample_stream(d, k, scenario("11i1", 3, 4), 6, seed=0)            # class-continual: classes in order, once each
    assert visit_order(s.classes) == [0, 1, 2, 3]
    s = sample_stream(d, k, scenario("1111", 3, 4), 6, seed=0)            # both continual: states in (domain, class) order
    assert visit_order(s.domains * 4 + s.classes) == list(range(12))
    np.testing.assert_array_equal(s.counts, s.quota)


def test_scenario_matrix_is_the_kronecker_product():
    sc = scenario("nuiu", 4, 5)
    T = sc.transition_matrix()
    np.testing.assert_allclose(T, np.kron(transition_matrix(4, 0.25, 5, strict=False), transition_matrix(5, 0.95, 10)))
    np.testing.assert_allclose(T.sum(1), 1)
