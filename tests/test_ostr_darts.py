"""OStr-DARTS chapter: golden outputs of the official DARTS / NB201 code, official parameter counts, the selection criteria against finite differences and closed forms, genotype rules, bad inputs."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from paperlab.core import repo_root
from paperlab.ostr_darts import (CRITERIA, DARTS_V2, NB201_PRIMITIVES, DartsNetwork, DartsSearchCell, DartsSearchNetwork, MixedOp,
                                 NB201Network, NB201SearchCell, NB201SearchNetwork, Supernet, arch_index, bench_archs,
                                 check_darts_genotype, count_darts_params, criterion_scores, darts_genotype, darts_mixed_op,
                                 darts_op, exact_unrolled_arch_grad, first_order_arch_grad, load_benchmark, load_official_state,
                                 nb201_from_str, nb201_op, nb201_str, official_name, removal_scores, search, search_trial,
                                 second_order_arch_grad, strength_scores, supernet_loss, GroupedNB201Network, darts_node_edges,
                                 darts_pt_scores, darts_space_genotype, fit_fixed, fit_grouped, project_edge, projected_weights,
                                 darts_pt_project, darts_pt_plan, darts_pt_lr, DARTS_PRIMITIVES, alpha_grad_term, search_split)

DATA = repo_root() / "data" / "ostr_darts"
G = DATA / "golden"
OFFICIAL = json.loads((DATA / "official_counts.json").read_text())["counts"]


def st(z, prefix):
    return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


def _golden_cases():
    "(name, module factory, state, forward, reference) for every golden output."
    z1, z2, z3 = np.load(G / "darts_mixedop.npz"), np.load(G / "darts_cell.npz"), np.load(G / "nb201_search_cell.npz")
    z4, z5 = np.load(G / "nb201_supernet.npz"), np.load(G / "darts_supernet.npz")
    t = torch.from_numpy
    cases = [(f"mixed{s}", lambda s=s: darts_mixed_op(4, s), st(z1, f"mixed{s}.state."),
              lambda m, s=s: m(t(z1[f"mixed{s}.x"]), t(z1[f"mixed{s}.w"])), z1[f"mixed{s}.y"]) for s in (1, 2)]
    for name, red, rp in (("normal", False, False), ("reduce", True, False), ("after_reduce", False, True)):
        cases.append((f"cell-{name}", lambda red=red, rp=rp: DartsSearchCell(4, 4, 6, 5, 4, red, rp), st(z2, f"{name}.state."),
                      lambda m, name=name: m(t(z2[f"{name}.s0"]), t(z2[f"{name}.s1"]), t(z2[f"{name}.w"])), z2[f"{name}.y"]))
    cases.append(("nb201-cell", lambda: NB201SearchCell(4, 4, 1, 4), st(z3, "state."), lambda m: m(t(z3["x"]), t(z3["w"])), z3["y"]))
    cases.append(("nb201-supernet", lambda: NB201SearchNetwork(4, 1, 4, 10), st(z4, "nb201.state."), lambda m: m(t(z4["nb201.x"])),
                  z4["nb201.logits"]))
    cases.append(("darts-supernet", lambda: DartsSearchNetwork(4, 10, 3),
                  {**st(z5, "darts.state."), "alphas_normal": z5["darts.alphas_normal"], "alphas_reduce": z5["darts.alphas_reduce"]},
                  lambda m: m(t(z5["darts.x"])), z5["darts.logits"]))
    return cases


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c[0])
def test_golden_official_outputs(case):
    # official quark0/darts f276dd3 and AutoDL-Projects f46486e, float64, train-mode BN (data/ostr_darts/golden/README.md)
    _, make, state, fwd, ref = case
    with torch.no_grad():
        m = load_official_state(make().double().train(), state)
        assert np.abs(fwd(m).numpy() - ref).max() < 1e-12
        # sensitivity: one weight moved by 1e-3 and the outputs no longer agree
        m2 = load_official_state(make().double().train(), state)
        next(p for p in m2.parameters() if p.numel() > 1).view(-1)[0] += 1e-3
        assert np.abs(fwd(m2).numpy() - ref).max() > 1e-6


def test_name_map_and_official_genotype():
    assert official_name("_ops.3._ops.4.op.1.weight") == "edges.3.ops.4.op.1.weight"
    assert official_name("cells.0.edges.2<-1.3.op.1.bias") == "cells.0.edges.2<-1.ops.3.op.1.bias"
    assert official_name("preprocess0.conv_1.weight") == "preprocess0.convs.0.weight"
    assert official_name("arch_parameters") == "alphas"
    z = np.load(G / "darts_supernet.npz")
    m = load_official_state(DartsSearchNetwork(4, 10, 3).double(), {**st(z, "darts.state."), "alphas_normal": z["darts.alphas_normal"],
                                                                    "alphas_reduce": z["darts.alphas_reduce"]})
    assert json.loads(json.dumps(m.genotype()._asdict())) == json.loads(str(z["darts.genotype"]))
    with pytest.raises(ValueError, match="no paperlab counterpart"):
        load_official_state(NB201SearchCell(4, 4, 1, 4), {"bogus.weight": np.zeros(1)})


def test_parameter_counts_match_official_code():
    assert sum(p.numel() for p in NB201SearchNetwork(16, 5).weight_parameters()) == OFFICIAL["nb201_search_supernet"]["weights"]
    assert sum(p.numel() for p in NB201SearchNetwork(16, 5).arch_parameters()) == OFFICIAL["nb201_search_supernet"]["arch"]
    assert sum(p.numel() for p in DartsSearchNetwork().weight_parameters()) == OFFICIAL["darts_search_supernet"]["weights"]
    ev = DartsNetwork(DARTS_V2)
    assert count_darts_params(ev) == OFFICIAL["darts_eval_cifar10"]["without_auxiliary"]
    assert sum(p.numel() for p in ev.parameters()) == OFFICIAL["darts_eval_cifar10"]["total"]
    assert count_darts_params(ev) == pytest.approx(3.3e6, rel=0.02)   # DARTS paper, Table 1: 3.3M
    best = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
    assert sum(p.numel() for p in NB201Network(best).parameters()) == OFFICIAL["nb201_network_best_cell"]["total"]


def _tiny():
    torch.manual_seed(0)
    net = NB201SearchNetwork(C=4, N=1, max_nodes=3, num_classes=10, in_channels=1).double()
    with torch.no_grad(): net.alphas.normal_()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    return net.eval(), data


def test_none_has_zero_strength_and_removal():
    net, data = _tiny()
    assert strength_scores(net, data)[0][:, 0].abs().max() == 0
    assert removal_scores(net, data)[0][:, 0].abs().max() == 0


def test_strength_is_minus_beta_times_finite_difference():
    net, data = _tiny()
    S = strength_scores(net, data)[0]
    beta = net.arch_weights()[0].detach()
    for e, o in [(0, 1), (1, 2), (2, 3), (1, 4)]:
        bp, bm = beta.clone(), beta.clone(); bp[e, o] += 1e-6; bm[e, o] -= 1e-6
        fd = (supernet_loss(net, data, [bp])[0] - supernet_loss(net, data, [bm])[0]) / 2e-6
        assert -beta[e, o] * fd == pytest.approx(float(S[e, o]), abs=1e-8)


def test_masking_a_zero_op_leaves_the_loss():
    net, data = _tiny()
    b = net.arch_weights()[0].detach().clone(); b[2, 3] = 0.0
    b2 = b.clone(); b2[2, 3] = 0.0; b2[1, 0] = 0.0   # mask it again, and mask `none`
    assert supernet_loss(net, data, [b]) == supernet_loss(net, data, [b2])


class _Edge(Supernet):
    def __init__(self, ops, names):
        super().__init__(); self.edge = MixedOp(ops, names)
        self.alphas = nn.Parameter(torch.randn(1, len(ops), dtype=torch.float64))

    def forward(self, x, weights=None):
        return self.edge(x, (self.arch_weights() if weights is None else weights)[0][0]).flatten(1)


def test_linear_loss_strength_equals_exact_removal():
    torch.manual_seed(3)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    m = _Edge([nb201_op(o, 4, 4, 1) for o in NB201_PRIMITIVES], NB201_PRIMITIVES).double().eval()
    c = torch.randn(144, dtype=torch.float64)
    loss = lambda out, y: (out @ c).mean()   # linear in the mixed output
    np.testing.assert_allclose(strength_scores(m, [(x, None)], loss)[0], removal_scores(m, [(x, None)], loss_fn=loss)[0], atol=1e-12)


def test_identical_ops_strength_selection_is_magnitude_selection():
    torch.manual_seed(4)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    conv = nb201_op("nor_conv_3x3", 4, 4, 1).double().eval()
    m = _Edge([conv] * 5, [f"c{k}" for k in range(5)]).double().eval()
    y = torch.randint(0, 144, (3,))
    S = strength_scores(m, [(x, y)])[0][0]
    ratio = S / m.arch_weights()[0][0].detach()
    np.testing.assert_allclose(ratio, ratio[0].expand(5), rtol=1e-10)    # S_o = β_o · (one factor for all o)
    if ratio[0] > 0: assert int(S.argmax()) == int(m.alphas.argmax())


def test_second_order_gradient_is_the_exact_hypergradient():
    net, data = _tiny()
    net.train()
    (xa, ya), (xb, yb) = data
    exact = exact_unrolled_arch_grad(net, xa, ya, xb, yb, eta=0.05)[0]
    approx = second_order_arch_grad(net, xa, ya, xb, yb, 0.05, None, 0.0, 0.0, r=1e-6)[0]
    assert float((approx - exact).norm() / exact.norm()) < 1e-8
    np.testing.assert_allclose(second_order_arch_grad(net, xa, ya, xb, yb, 0.0, None, 0.0, 0.0)[0],
                               first_order_arch_grad(net, xb, yb)[0], atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_darts_genotype_rules(seed):
    g = torch.Generator().manual_seed(seed)
    geno = darts_genotype(torch.randn(14, 8, generator=g), torch.randn(14, 8, generator=g))
    check_darts_genotype(geno)                            # two inputs per node, from earlier states, never `none`
    for cell in (geno.normal, geno.reduce):
        for i in range(4): assert cell[2 * i][1] != cell[2 * i + 1][1]
    # `none` scoring highest everywhere is still never chosen
    s = torch.zeros(14, 8); s[:, 0] = 10.0; s[:, 5] = 1.0
    assert {op for op, _ in darts_genotype(s, s).normal} == {"sep_conv_5x5"}


def test_nb201_genotypes_and_bench_index():
    archs = bench_archs()
    assert len(archs) == 125 and len(set(archs)) == 125
    assert [arch_index(a) for a in archs] == list(range(125))
    assert all(nb201_from_str(nb201_str(a)) == a for a in archs)
    net = NB201SearchNetwork(C=4, N=1, max_nodes=3, in_channels=1)
    s = torch.zeros(3, 5); s[0, 3] = s[1, 1] = s[2, 0] = 1
    assert nb201_str(net.genotype([s])) == "|nor_conv_3x3~0|+|skip_connect~0|none~1|"


def test_stored_benchmark():
    b = load_benchmark()
    acc = np.array(b["test_acc"])
    assert b["archs"] == [nb201_str(a) for a in bench_archs()]
    assert acc.shape == (125, len(b["config"]["seeds"])) and (acc >= 0).all() and (acc <= 1).all()
    # a cell whose output node is cut off from the input predicts one class: at most the largest class share (~10%)
    assert acc[arch_index(nb201_from_str("|none~0|+|none~0|none~1|"))].max() < 0.15


@pytest.mark.parametrize("bad", [
    lambda: darts_op("conv_9x9", 4, 1), lambda: nb201_op("sep_conv_3x3", 4, 4, 1), lambda: nb201_op("nor_conv_3x3", 4, 4, 3),
    lambda: NB201SearchCell(4, 4, 1, max_nodes=1), lambda: NB201SearchNetwork(C=0), lambda: NB201SearchNetwork(N=0),
    lambda: NB201SearchNetwork(op_names=("none", "conv_9x9")), lambda: DartsSearchCell(0, 4, 8, 8, 4, False, False),
    lambda: DartsSearchCell(4, 7, 8, 8, 4, False, False), lambda: darts_op("skip_connect", 5, 2), lambda: DartsNetwork(layers=2),
    lambda: darts_genotype(torch.zeros(10, 8), torch.zeros(14, 8)), lambda: nb201_from_str("|nor_conv_3x3~1|"),
    lambda: darts_mixed_op(4, 1)(torch.zeros(1, 4, 4, 4), torch.ones(3)),
    lambda: NB201SearchCell(4, 4, 1, 3)(torch.zeros(1, 4, 4, 4), torch.ones(2, 5)),
    lambda: criterion_scores("random", NB201SearchNetwork(4, 1, 3)), lambda: criterion_scores("strength", NB201SearchNetwork(4, 1, 3)),
    lambda: search(NB201SearchNetwork(4, 1, 3), None, None, 1, order=3), lambda: search_trial(0, []),
    lambda: GroupedNB201Network([]), lambda: darts_node_edges(0),
    lambda: project_edge(NB201SearchNetwork(4, 1, 3), [], [torch.ones(3, 5)], 0, [0, 1, 2], metric="f1"),
    lambda: darts_space_genotype(DartsSearchNetwork(2, 10, 3), [torch.zeros(14, 8)] * 2, topology="top3"),
    lambda: darts_pt_scores(NB201SearchNetwork(4, 1, 3), None, None, topology=True),
    lambda: darts_pt_plan([range(3)], order="random"), lambda: darts_pt_lr(0, 5, "linear"), lambda: darts_pt_lr(5, 5),
    lambda: darts_pt_project(NB201SearchNetwork(4, 1, 3), None, None, tune_lr="step"),
    lambda: darts_pt_project(NB201SearchNetwork(4, 1, 3), None, None, tune_epochs=-1),
    lambda: search(NB201SearchNetwork(4, 1, 3), None, None, 1, optimizers=(None,)),
])
def test_bad_inputs_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()


def test_criteria_names():
    assert CRITERIA == ("magnitude", "strength", "removal", "darts-pt")


def test_strength_is_scaled_magnitude_minus_alpha_gradient():
    # S_o = −ḡ·β_o − ∂L/∂α_o with ḡ = Σ_k β_k ∂L/∂β_k (softmax chain rule), per edge
    net, data = _tiny()
    S = strength_scores(net, data)[0]
    beta = net.arch_weights()[0].detach().requires_grad_()
    n = sum(len(y) for _, y in data)
    gb = torch.autograd.grad(sum(torch.nn.functional.cross_entropy(net(x, [beta]), y) * len(y) for x, y in data) / n, beta)[0]
    a = net.alphas.detach().clone().requires_grad_()
    ga = torch.autograd.grad(sum(torch.nn.functional.cross_entropy(net(x, [a.softmax(-1)]), y) * len(y) for x, y in data) / n, a)[0]
    np.testing.assert_allclose(S, -(beta.detach() * gb).sum(1, keepdim=True) * beta.detach() - ga, atol=1e-12)


def test_alpha_grad_term_is_minus_the_alpha_gradient():
    # the chapter's `alpha-grad` ablation selects by S − β·ΣS; it must be −∂L/∂α, here by autograd through the softmax (float64)
    net, data = _tiny()
    S, beta = strength_scores(net, data)[0], net.arch_weights()[0].detach()
    a = net.alphas.detach().clone().requires_grad_()
    n = sum(len(y) for _, y in data)
    ga = torch.autograd.grad(sum(torch.nn.functional.cross_entropy(net(x, [a.softmax(-1)]), y) * len(y) for x, y in data) / n, a)[0]
    np.testing.assert_allclose(alpha_grad_term(S, beta), -ga, atol=1e-12)
    assert (alpha_grad_term(S, beta) - S).abs().max() > 1e-4        # and it is not the strength itself
    with pytest.raises(ValueError, match="same shape"):
        alpha_grad_term(S, beta[:2])


def test_search_trial_records_the_supernets_own_accuracy():
    # the ledger's precondition reads `supernet_acc`: the searched supernet's accuracy on the 256 validation images (train-mode BN),
    # recomputed here from an independent rerun of the same search; one epoch lifts it well above chance (10%), an untrained one stays near it
    from paperlab.core import seed_everything
    r = search_trial(0, [1], criteria=("magnitude",), C=4)
    seed_everything(0)
    tr, va = search_split(0)
    net = NB201SearchNetwork(C=4, N=1, max_nodes=3, num_classes=10, in_channels=1)
    untrained = NB201SearchNetwork(C=4, N=1, max_nodes=3, num_classes=10, in_channels=1)
    search(net, tr, va, 1, seed=0)
    x, y = va.tensors[0][:256], va.tensors[1][:256]
    with torch.no_grad():
        acc = float((net.train()(x).argmax(1) == y).double().mean())
        acc0 = float((untrained.train()(x).argmax(1) == y).double().mean())
    assert r["checkpoints"][1]["supernet_acc"] == pytest.approx(acc, abs=1e-12)
    assert acc > 0.3 and acc0 < 0.2


def test_darts_pt_without_tuning_is_argmax_of_accuracy_drop_on_one_edge():
    # one edge (2-node cell): DARTS-PT's single decision is the op whose removal lowers validation accuracy most (first on ties)
    from torch.utils.data import TensorDataset
    torch.manual_seed(5)
    net = NB201SearchNetwork(C=4, N=1, max_nodes=2, num_classes=10, in_channels=1).train()
    with torch.no_grad(): net.alphas.normal_()
    g = torch.Generator().manual_seed(2)
    ds = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    pt = criterion_scores("darts-pt", net, ds, ds, tune_epochs=0)[0]
    drop = removal_scores(net, [ds.tensors], metric="acc")[0]
    assert pt.sum() == 1 and int(pt.argmax()) == int(drop.argmax())


def test_search_trial_records_what_each_criterion_selects():
    r = search_trial(0, [1], criteria=("magnitude", "strength", "removal"), C=4)
    rec = r["checkpoints"][1]
    for name in ("alpha", "strength", "removal"):
        key = {"alpha": "magnitude"}.get(name, name)
        geno = tuple(tuple((NB201_PRIMITIVES[int(torch.tensor(rec[name])[e].argmax())], j) for j, e in js)
                     for js in ([(0, 0)], [(0, 1), (1, 2)]))     # edges 1<-0, 2<-0, 2<-1
        assert rec["arch"][key] == arch_index(geno)
    assert np.allclose(np.array(rec["beta"]), torch.tensor(rec["alpha"]).softmax(-1).numpy())


def test_grouped_training_is_cell_by_cell_training():
    # GroupedNB201Network trains G cells as one module; per cell it must be `fit_fixed` (float64, same init, batches, SGD)
    from paperlab.data import digits
    from torch.utils.data import TensorDataset
    x, y = digits(8, "train", seed=0).tensors
    sub = TensorDataset(x[:96], y[:96])
    cells = [bench_archs()[k] for k in (0, 38, 124)]          # all-`none`, mixed, all-`avg_pool`
    grouped = fit_grouped(cells, sub, 2, seed=7, dtype=torch.float64)
    singles = [fit_fixed(c, sub, 2, seed=7, dtype=torch.float64) for c in cells]
    xt = x[96:160].double()
    with torch.no_grad():
        out = grouped(xt.repeat(1, 3, 1, 1))
        for g, net in enumerate(singles):
            assert (out[:, g] - net(xt)).abs().max() < 1e-12
        assert (out[:, 1] - singles[2](xt)).abs().max() > 1e-3     # and a different cell's network does not agree


def test_darts_node_edges_is_official_nid2eids():
    # ruocwang/darts-pt sota/cnn/model_search_darts_proj.py: nid2eids = {0: [2, 3, 4], 1: [5, 6, 7, 8], 2: [9, 10, 11, 12, 13]}
    assert darts_node_edges(4) == {0: [2, 3, 4], 1: [5, 6, 7, 8], 2: [9, 10, 11, 12, 13]}


def _tiny_darts(steps=3):
    torch.manual_seed(6)
    net = DartsSearchNetwork(C=2, num_classes=10, layers=3, steps=steps, multiplier=steps, in_channels=1).double().train()
    with torch.no_grad():
        for a in net.arch_parameters(): a.normal_()
    g = torch.Generator().manual_seed(3)
    return net, [(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))]


def test_project_edge_drops_the_least_harmful_edge_each_round():
    net, data = _tiny_darts()
    w = [b.detach() for b in net.arch_weights()]
    eids = darts_node_edges(3)[1]                              # node 3 of the cell: 4 inputs, edges 5..8
    removed_loss = lambda keep_w, e: supernet_loss(net, data, [x if m != 0 else x.index_fill(0, torch.tensor([e]), 0.0)
                                                              for m, x in enumerate(keep_w)])[0]
    left = list(eids)
    for _ in range(2):     # official: each round evaluates on the projected weights as given (earlier drops of this node not zeroed)
        losses = {e: removed_loss(w, e) for e in left}
        left.remove(min(left, key=lambda e: (losses[e], -e)))  # smallest loss after removal; ties: the later edge
    assert project_edge(net, data, w, 0, eids, metric="loss") == left
    # every removal equally harmless (the node's rows already zero): ties drop the later edges, the first two stay
    wz = [x.clone() for x in w]; wz[0][eids] = 0.0
    assert project_edge(net, data, wz, 0, eids, metric="acc") == eids[:2]


def test_darts_pt_topology_keeps_two_projected_inputs_per_node():
    from torch.utils.data import TensorDataset
    net, data = _tiny_darts(steps=2)                         # 5 edges per cell; the second node chooses 2 of 3 inputs
    ds = TensorDataset(*data[0])
    pt = darts_pt_scores(net, ds, ds, tune_epochs=0, topology=True, batch_size=16)
    geno = net.genotype(pt)
    check_darts_genotype(geno, 2)
    for m, (p, cell) in enumerate(zip(pt, (geno.normal, geno.reduce))):
        assert ((p.sum(1) == 1) | (p.sum(1) == 0)).all() and (p.max(1).values <= 1).all()
        assert p[:2].sum() == 2                                  # the first node's two inputs are never dropped
        for nid, eids in darts_node_edges(2).items():
            kept = [e for e in eids if p[e].sum() == 1]
            assert len(kept) == 2
            assert sorted(j for _, j in cell[2 * (nid + 1):2 * (nid + 2)]) == [e - eids[0] for e in kept]
    # 'project' on given op choices: the kept edges carry the chosen ops
    g2 = darts_space_genotype(net, [b.detach() for b in net.arch_weights()], "project", data)
    check_darts_genotype(g2, 2)
    top = darts_space_genotype(net, [b.detach() for b in net.arch_weights()], "top2")
    assert [op for op, _ in g2.normal[:2]] and {op for op, _ in top.normal[:2]} == {op for op, _ in g2.normal[:2]}


class _ToyDarts(Supernet):
    "A DARTS-shaped supernet (normal and reduce α, `steps` nodes) at the cost of a linear model: logits = Σ_m Σ_eo β_meo · tanh(x) V_meo."
    primitives = DARTS_PRIMITIVES[:4]
    genotype = DartsSearchNetwork.genotype

    def __init__(self, steps=3, d=6):
        super().__init__()
        self.steps = self.multiplier = steps
        E = sum(2 + i for i in range(steps))
        self.alphas_normal = nn.Parameter(torch.randn(E, 4))
        self.alphas_reduce = nn.Parameter(torch.randn(E, 4))
        self.feat = nn.Parameter(0.5 * torch.randn(2, E, 4, d, 10))

    def forward(self, x, weights=None):
        w = self.arch_weights() if weights is None else weights
        return sum(torch.einsum("bd,eo,eodk->bk", torch.tanh(x), wm, self.feat[m]) for m, wm in enumerate(w))


def _toy_pt(seed=0, steps=3):
    from torch.utils.data import TensorDataset
    torch.manual_seed(seed)
    net = _ToyDarts(steps).double()
    g = torch.Generator().manual_seed(seed + 1)
    ds = TensorDataset(torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g))
    return net, ds


def _rounds(log):
    "The decisions of a DARTS-PT log grouped into rounds (split at tuning epochs), and the tuning epochs after each round."
    rounds, tunes = [[]], [[]]
    for ev in log:
        if ev[0] == "tune":
            tunes[-1].append(ev)
        else:
            if tunes[-1]: rounds.append([]); tunes.append([])
            rounds[-1].append(ev[:3])
    return rounds, tunes


@pytest.mark.parametrize("seed", range(3))
def test_darts_pt_official_schedule(seed):
    # ruocwang/darts-pt 4ec3149 sota/cnn/projection.py:157-183: each round `project_op(normal)` then `project_op(reduce)`
    # (a random remaining edge each), then `proj_intv` tuning epochs; after the 14 edges, `project_edge` the same way per node
    net, ds = _toy_pt(seed)
    E, nodes, intv = net.alphas_normal.shape[0], list(darts_node_edges(3)), 2
    log = []
    darts_pt_project(net, ds, ds, intv, seed=seed, batch_size=16, topology=True, log=log)
    rounds, tunes = _rounds(log)
    assert len(rounds) == E + len(nodes)                                   # 9 + 2 rounds, not 2·9 + 2·2 decisions apart
    for r, (dec, tun) in enumerate(zip(rounds, tunes)):
        kind = "op" if r < E else "node"
        assert [(k, m) for k, m, _ in dec] == [(kind, 0), (kind, 1)]     # normal, then reduce, in every round
        assert [t[1] for t in tun] == ([r * intv + k for k in range(intv)] if r < len(rounds) - 1 else [])
    for m in (0, 1):                                                     # every edge and node decided once per cell
        assert sorted(d[m][2] for d in rounds[:E]) == list(range(E))
        assert sorted(d[m][2] for d in rounds[E:]) == nodes


def test_darts_pt_order_is_random_per_cell_and_paper_order_is_one_decision_per_round():
    seqs = []
    for seed in range(4):
        net, ds = _toy_pt(seed)
        log = []
        darts_pt_project(net, ds, ds, 0, seed=seed, batch_size=16, topology=True, log=log)
        seqs.append([tuple(e[2] for e in log if e[0] == "op" and e[1] == m) for m in (0, 1)])
    E = len(seqs[0][0])
    assert any(s[0] != tuple(range(E)) for s in seqs)                  # not the fixed edge order
    assert any(s[0] != s[1] for s in seqs)                             # the two cells draw their own edges
    assert len({s[0] for s in seqs}) > 1                               # the seed changes the order
    # the paper's Algorithm 1: one random (cell, edge) per round, tuned after each: 2·9 + 2·2 − 1 tuning intervals
    net, ds = _toy_pt(0)
    log = []
    darts_pt_project(net, ds, ds, 1, seed=0, batch_size=16, topology=True, log=log, order="paper")
    rounds, tunes = _rounds(log)
    assert [len(d) for d in rounds] == [1] * (2 * E + 2 * 2) and sum(map(len, tunes)) == 2 * E + 2 * 2 - 1


def test_darts_pt_decisions_are_the_removal_argmax_given_the_earlier_ones():
    # naive restatement of `project_op` (metric 'loss', no tuning): each decision in log order maximises the loss after removing
    # the op, on β with every earlier decision (the other cell's of the same round included) made one-hot
    net, ds = _toy_pt(1)
    log = []
    darts_pt_project(net, ds, ds, 0, metric="loss", seed=1, batch_size=32, log=log)
    w = [b.detach().clone() for b in net.arch_weights()]
    for _, m, e, o in log:
        losses = []
        for k in range(w[m].shape[1]):
            wk = [x.clone() for x in w]; wk[m][e, k] = 0.0
            losses.append(supernet_loss(net, [ds.tensors], wk)[0])
        assert o == int(np.argmax(losses))
        w[m][e] = 0.0; w[m][e, o] = 1.0


def test_darts_pt_tuning_lr_is_the_official_scheduler():
    # projection.py:134-136 builds CosineAnnealingLR(optimizer at LR/10, T = proj_intv·num_projs + 1, eta_min=learning_rate_min)
    # and never calls scheduler.step(): what runs is LR/10 = 0.0025 throughout; 'cosine' is the scheduler stepped per epoch
    net, ds = _toy_pt(2, steps=2)
    intv = 2
    logs = {}
    for mode in ("constant", "cosine"):
        logs[mode] = []
        darts_pt_project(net, ds, ds, intv, seed=2, batch_size=16, topology=True, tune_lr=mode, log=logs[mode])
    n_rounds = len(_rounds(logs["constant"])[0])
    T = intv * (n_rounds - 1) + 1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.025 / 10)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(T), eta_min=0.001)
    never_stepped = [opt.param_groups[0]["lr"]] * (T - 1)
    stepped = []
    for _ in range(T - 1): stepped.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    for mode, ref in (("constant", never_stepped), ("cosine", stepped)):
        tunes = [e for e in logs[mode] if e[0] == "tune"]
        assert [t for _, t, _ in tunes] == list(range(T - 1))
        np.testing.assert_allclose([lr for *_, lr in tunes], ref, rtol=1e-12)
    # closed form of the cosine: η_min + (η_0 − η_min)(1 + cos(π t / T)) / 2
    np.testing.assert_allclose(stepped, [0.001 + 0.0015 * (1 + math.cos(math.pi * t / T)) / 2 for t in range(T - 1)], rtol=1e-12)
    assert never_stepped[-1] == stepped[0] == 0.0025 and stepped[-1] < 0.0012


def test_darts_pt_keeps_one_optimizer_for_the_whole_projection(monkeypatch):
    # `model.reset_optimizer(LR / 10, ...)` once before the loop: θ's momentum carries from one round to the next
    import paperlab.ostr_darts as od
    made = []
    real = od.search_optimizers
    monkeypatch.setattr(od, "search_optimizers", lambda *a, **k: made.append(1) or real(*a, **k))
    net, ds = _toy_pt(0, steps=2)
    darts_pt_project(net, ds, ds, 1, seed=0, batch_size=16, topology=True)
    assert len(made) == 1


def test_project_topology_node_order_is_random_alternating_cells():
    # the official `project_edge` rounds: one random remaining node of the normal cell, then one of the reduce cell
    seen = set()
    for seed in range(6):
        net, ds = _toy_pt(seed, steps=4)
        log = []
        g = darts_space_genotype(net, [b.detach() for b in net.arch_weights()], "project", [ds.tensors], seed=seed, log=log)
        check_darts_genotype(g, 4)
        assert [m for _, m, _, _ in log] == [0, 1] * 3
        for m in (0, 1): assert sorted(n for _, mm, n, _ in log if mm == m) == [0, 1, 2]
        seen.add(tuple(n for _, m, n, _ in log if m == 0))
    assert len(seen) > 1 and seen != {(0, 1, 2)}
