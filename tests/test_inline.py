"""InLine chapter: every registered model against the paper's counts, attention forms against their references, bad inputs."""
import json
from pathlib import Path

import pytest
import timm
import torch

from paperlab.attention import ATTENTION, get_attention
from paperlab.core import count_flops, count_params, get_mode
from paperlab.inline import (MODEL_CONFIGS, InLineAttention, create_inline_model, depthwise_per_image,
                             depthwise_per_image_ref, parse_attn_types, tiny_vit)

PAPER = json.loads((Path(__file__).resolve().parent.parent / "data" / "inline" / "paper_numbers.json").read_text())["models"]


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_full_size_model_matches_official_counts(name):
    # official code built with random weights (issue 3): e.g. InLine-DeiT-T 6.48M / 1.11 G, InLine-Swin-B 88.35M / 15.40 G
    model = timm.create_model(name)
    size = MODEL_CONFIGS[name].img_size
    params_m = count_params(model) / 1e6
    flops_g = count_flops(model, torch.randn(1, 3, size, size)).giga
    assert abs(params_m / PAPER[name]["counted_params_M"] - 1) < 0.01, params_m
    assert abs(flops_g / PAPER[name]["counted_flops_G"] - 1) < 0.05, flops_g


def test_registered_with_timm():
    assert set(MODEL_CONFIGS) <= set(timm.list_models("inline_*"))


@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("n,m", [(7, 7), (5, 11)])
def test_fast_form_equals_reference(name, n, m):
    fast, weights = get_attention(name)
    g = torch.Generator().manual_seed(n * m)
    q, k, v = torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, m, 8, generator=g), torch.randn(2, 3, m, 5, generator=g)
    torch.testing.assert_close(fast(q, k, v), weights(q, k) @ v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_mismatched_qkv_is_a_clear_error(name):
    fast, _ = get_attention(name)
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 8\)"):
        fast(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="token count"):
        fast(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 8))


def test_local_term_reference_and_grid_errors():
    v, w = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(depthwise_per_image(v, w), depthwise_per_image_ref(v, w))
    with pytest.raises(ValueError, match="square grid"):
        InLineAttention(32, 2)(torch.randn(1, 1 + 15, 32))
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        InLineAttention(32, 2)(torch.randn(16, 32))


def test_local_term_changes_only_patch_tokens():
    torch.manual_seed(0)
    with_local = InLineAttention(32, 2, local=True).eval()
    without = InLineAttention(32, 2, local=False).eval()
    without.load_state_dict({k: v for k, v in with_local.state_dict().items() if not k.startswith("local.")})
    x = torch.randn(2, 1 + 16, 32)
    with torch.no_grad():
        a, b = with_local(x), without(x)
    torch.testing.assert_close(a[:, 0], b[:, 0])          # class token: global term only
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3        # patch tokens: plus the local term


def test_unknown_names_and_modes():
    with pytest.raises(ValueError, match="unknown InLine model"):
        create_inline_model("inline_deit_large")
    with pytest.raises(ValueError, match="unknown attention"):
        tiny_vit("cosine", False)
    with pytest.raises(ValueError, match="unknown mode"):
        get_mode("slow")
    with pytest.raises(ValueError, match="random weights only"):
        timm.create_model("inline_swin_tiny", pretrained=True)
    with pytest.raises(ValueError, match="I/S/M"):
        parse_attn_types("IIX", (2, 2, 6))


def test_swin_base_mixed_stage():
    # official IIMS2: stage 3 has 2 InLine blocks (whole 14x14 map, no shift), then 16 shifted 7x7 softmax windows
    model = create_inline_model("inline_swin_base")
    blocks = model.layers[2].blocks
    kinds = ["I" if isinstance(b.attn, InLineAttention) else "S" for b in blocks]
    assert kinds == parse_attn_types("IIMS2", (2, 2, 18, 2))[2] == ["I", "I"] + ["S"] * 16
    assert tuple(blocks[0].window_size) == (14, 14) and tuple(blocks[0].shift_size) == (0, 0)
    assert tuple(blocks[3].window_size) == (7, 7) and tuple(blocks[3].shift_size) == (3, 3)


def test_model_cost_works_from_the_package():
    # the exported helper must not depend on names the notebook imported elsewhere
    from paperlab.inline import model_cost
    cost = model_cost("inline_deit_tiny")
    assert abs(cost["params_M"] / PAPER["inline_deit_tiny"]["counted_params_M"] - 1) < 0.01


# --- the official recipe (issue 9 §3) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,rate", [("inline_deit_tiny", 0.1), ("inline_swin_tiny", 0.2), ("inline_swin_small", 0.3),
                                       ("inline_swin_base", 0.5)])
def test_official_init_and_drop_path(name, rate):
    # official _init_vit_weights / Swin _init_weights: trunc_normal_(std=.02), zero bias; drop-path from the official yamls
    from paperlab.inline import InLineAttention
    model = create_inline_model(name)
    att = [a for a in model.modules() if isinstance(a, InLineAttention)]
    w = torch.cat([p.weight.flatten() for a in att for p in (a.qkv, a.proj)])
    assert abs(w.std().item() - 0.02) < 4e-4, w.std()            # PyTorch's default would give ~0.042 at C = 192
    assert w.abs().max() <= 2.0                                   # timm's trunc_normal_ cuts at ±2 (absolute)
    assert all((a.qkv.bias == 0).all() and (a.proj.bias == 0).all() for a in att)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for b in model.modules() if hasattr(b, "drop_path1")]
    expected = torch.linspace(0, rate, len(rates))                # stochastic depth decay rule of the official code
    torch.testing.assert_close(torch.tensor(rates), expected)


def test_kernel_functions_match_their_formulas():
    from paperlab.inline import INLINE_KERNELS, exp_kernel
    x = torch.linspace(-4, 4, 33, dtype=torch.float64)
    expected = {"identity": x, "relu": torch.where(x > 0, x, 0 * x), "leakyrelu": torch.where(x > 0, x, 0.01 * x),
                "exp": torch.tensor([__import__("math").exp(0.2 * v) for v in x.tolist()], dtype=torch.float64)}
    for name, phi in INLINE_KERNELS.items():
        got = x if phi is None else phi(x)
        torch.testing.assert_close(got, expected[name], atol=1e-15, rtol=1e-15)
    torch.testing.assert_close(exp_kernel(x, t=1.0), x.exp())


def test_kernel_func_bad_input():
    with pytest.raises(ValueError, match="unknown kernel_func"):
        InLineAttention(32, 2, kernel_func="elu")
    with pytest.raises(ValueError, match="InLine mixing only"):
        InLineAttention(32, 2, mixing="linear", kernel_func="relu")


# --- golden outputs of the official code (issue 9 §2; data/inline/golden/README.md) ---------------------------------

GOLDEN_CASES = ["deit_tiny_attention", "swin_stage1_block", "deit_reduced_model"] + \
    [f"swin_attention_kernels/{k}" for k in ("identity", "relu", "leakyrelu", "exp")]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_official_outputs(case):
    from paperlab.inline import golden_error, golden_modules
    module, call = golden_modules()[case]
    assert golden_error(case, module, call) < 1e-12


@pytest.mark.parametrize("param", ["proj.bias", "local.mlp.2.weight"])
def test_golden_sensitivity(param):
    # the same comparison fails when one stored weight moves by 1e-6
    from paperlab.inline import golden_modules, load_golden
    module, call = golden_modules()["deit_tiny_attention"]
    arrays, weights = load_golden("deit_tiny_attention")
    weights[param].view(-1)[0] += 1e-6
    module.load_state_dict(weights)
    with torch.no_grad():
        err = (call(module, torch.from_numpy(arrays["x"]).double()) - torch.from_numpy(arrays["y"])).abs().max().item()
    assert err > 1e-9


def test_golden_name_map_covers_every_weight():
    from paperlab.inline import golden_modules, load_golden
    module, _ = golden_modules()["deit_reduced_model"]
    _, weights = load_golden("deit_reduced_model")
    assert set(weights) == set(module.state_dict())


def test_golden_files_are_small():
    root = Path(__file__).resolve().parent.parent / "data" / "inline" / "golden"
    files = sorted(root.glob("*.npz"))
    assert len(files) == 4 and all(f.stat().st_size < 1_000_000 for f in files)


def test_package_imports_alone():
    # issue 9 §1: the module must not depend on names the notebook imported (plt was one)
    import subprocess, sys
    code = ("import torch, paperlab.inline as m; fig = m.plot_collinear_queries(torch.randn(8, 2), torch.tensor([1., .5]), "
            "[.5, 1., 2., 4.]); print(type(fig).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0 and "Figure" in out.stdout, out.stderr


def test_tiny_training_reproduces_bit_for_bit():
    # issue 9 §7a: under deterministic() the same seed gives the same weights and the same accuracy, run after run
    from paperlab.core import deterministic, seed_everything
    from paperlab.data import digits
    from paperlab.train import evaluate, fit
    deterministic(threads=1)
    train = torch.utils.data.Subset(digits(12, "train", seed=0), range(128))
    test = digits(12, "test", seed=0)
    runs = []
    for _ in range(2):
        seed_everything(3)
        model = tiny_vit("inline", True, depth=1, img_size=12)
        fit(model, train, epochs=1, lr=2e-3, batch_size=16, seed=3, progress=False)
        runs.append((evaluate(model.eval(), test), {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_local_mass_ignores_empty_rows():
    # a ReLU query with no positive coordinate gives an all-zero linear row: it must not turn the mean into NaN
    from paperlab.inline import local_mass
    q = torch.randn(1, 1, 1 + 16, 4)
    q[0, 0, 5] = -q[0, 0, 5].abs()
    k = torch.randn(1, 1, 1 + 16, 4).abs()
    val = local_mass("linear", q, k)
    assert 0.0 < val <= 1.0


def test_compute_floor_counts_inlines_two_products():
    # the compute floor of the speed section charges 2 FLOPs per multiply-add of the two products kᵀv and q·(kv):
    # PyTorch's FLOP counter on the fused form finds exactly those multiply-adds (bmm + baddbmm), H · 2·N·d·e
    from paperlab.attention import attention_macs, inline_attention
    from paperlab.core import count_flops
    q, k, v = torch.randn(3, 1, 6, 196, 32).unbind(0)
    counted = count_flops(inline_attention, q.contiguous(), k, v)
    assert counted.total == 6 * attention_macs("inline", 196, 32)
    assert set(counted.by_op) == {"bmm", "baddbmm"}


def test_matmul_rate_is_positive_and_refuses_bad_sizes():
    from paperlab.inline import matmul_rate
    assert matmul_rate(size=32, batch=2, repeats=3) > 0
    for bad in (dict(size=0), dict(batch=0), dict(repeats=0)):
        with pytest.raises(ValueError, match="must be positive"):
            matmul_rate(**bad)


# --- issue 22: controlled claims, the headline and its parts ------------------------------------------------------------

ARMS = ("softmax", "linear", "inline (no local)", "inline + local")


def experiment_rows(trained: dict, untrained: dict | None = None, seeds: list[int] | None = None) -> list[dict]:
    "Rows as the chapter's experiment writes them (accuracy, confusion and locality alike), shuffled: helpers must pair by seed."
    import random
    n = len(next(iter(trained.values())))
    seeds = seeds or list(range(n))
    untrained = untrained or {v: [10.0] * n for v in trained}
    rows = [{"variant": v, "seed": s, "state": state, "accuracy": x, "confusion": x / 100, "locality": x / 100}
            for state, table in (("trained", trained), ("untrained", untrained)) for v, vals in table.items()
            for s, x in zip(seeds, vals)]
    random.Random(0).shuffle(rows)
    return rows


def test_per_seed_pairs_by_seed_and_refuses_bad_input():
    from paperlab.inline import per_seed
    rows = experiment_rows({"linear": [30.0, 40.0, 50.0]}, seeds=[7, 3, 5])
    assert per_seed(rows, "linear") == ([3, 5, 7], [40.0, 50.0, 30.0])
    assert per_seed(rows, "linear", state="untrained") == ([3, 5, 7], [10.0, 10.0, 10.0])
    with pytest.raises(ValueError, match="no trained rows for variant 'softmax'"):
        per_seed(rows, "softmax")
    with pytest.raises(ValueError, match="state must be one of"):
        per_seed(rows, "linear", state="half-trained")


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_controlled_claim_is_vacuous_when_the_untrained_arms_pass_too(mode, monkeypatch):
    # the control is the same difference on the same seeds untrained: if it shows the gain too, the claim says nothing
    from paperlab.inline import controlled_paired
    from paperlab.ledger import SMOKE, Ledger
    a, b = [60.0, 62.0, 58.0, 61.0, 59.0], [50.0, 51.0, 49.0, 52.0, 48.0]     # a − b: 10 ± 1.6, t-interval [8.0, 12.0]
    fair = experiment_rows({"inline + local": a, "linear": b})
    leaky = experiment_rows({"inline + local": a, "linear": b},
                            {"inline + local": [20.0, 21.0, 19.0, 22.0, 20.0], "linear": [10.0, 11.0, 9.0, 10.0, 10.0]})
    led = Ledger("t", mode=mode)
    ok = controlled_paired(led, fair, "ok", "x", None, "pp", "inline + local", "linear")
    vac = controlled_paired(led, leaky, "vac", "x", None, "pp", "inline + local", "linear")
    assert ok.control.measured == 0.0 and ok.bounds == (-100.0, 100.0)
    assert abs(vac.control.measured - 10.4) < 1e-12 and vac.control.interval[0] > 0
    assert abs(ok.measured - 10.0) < 1e-12
    if mode == "full":
        assert (ok.verdict, vac.verdict) == ("direction reproduced", "vacuous")
    else:
        assert ok.verdict == vac.verdict == SMOKE


def test_controlled_claim_needs_both_arms_to_have_learnt_and_the_same_seeds():
    from paperlab.inline import controlled_paired
    from paperlab.ledger import Ledger
    led = Ledger("t", mode="full")
    stuck = experiment_rows({"inline + local": [60.0, 62.0, 58.0, 61.0], "linear": [50.0, 10.0, 49.0, 52.0]})
    c = controlled_paired(led, stuck, "stuck", "x", None, "pp", "inline + local", "linear")
    assert c.verdict == "inconclusive" and "learnt the data" in c.why and "10.0%" in c.why
    other_seeds = experiment_rows({"inline + local": [60.0, 62.0]}, seeds=[0, 1]) + \
        experiment_rows({"linear": [50.0, 51.0]}, seeds=[0, 2])
    with pytest.raises(ValueError, match="same seeds"):
        controlled_paired(led, other_seeds, "seeds", "x", None, "pp", "inline + local", "linear")


def test_accuracy_claims_credit_the_part_that_carries_the_gain(monkeypatch):
    # injectivity carries a 20 pp gain, the local term none: the headline (InLine + local vs linear) is credited to it
    from paperlab.inline import ACCURACY_CLAIMS, record_accuracy_claims
    from paperlab.ledger import Ledger
    linear = [40.0, 45.0, 38.0, 50.0, 42.0, 47.0]
    no_local = [x + 20 + d for x, d in zip(linear, [1.0, -1.0, 2.0, -2.0, 0.5, -0.5])]
    local = [x + d for x, d in zip(no_local, [3.0, -4.0, 2.0, -3.0, 4.0, -1.0])]        # mean 1/6 pp: no clear gain
    rows = experiment_rows({"softmax": [55.0] * 6, "linear": linear, "inline (no local)": no_local, "inline + local": local})
    led = Ledger("t", mode="full")
    claims = record_accuracy_claims(led, rows, cost_ratio=1.1)
    assert [c.id for c in claims] == list(ACCURACY_CLAIMS)
    assert [c.id for c in led.claims.values() if c.headline] == ["inline-local-beats-linear"]
    assert all(c.control is not None and c.bounds == (-100.0, 100.0) for c in claims)
    assert led["inline-beats-linear"].verdict == "direction reproduced"
    assert led["local-matters"].verdict == "inconclusive" and led["local-matters"].seeds_to_decide > 6
    assert led["inline-local-beats-linear"].verdict == "direction reproduced"
    assert led.carried_by("inline-local-beats-linear") == "carried by inline-beats-linear"
    assert "1.100× the multiply-adds" in led["inline-local-beats-linear"].note
    # the same gain carried by the local term instead
    mixing_only = [x + d for x, d in zip(linear, [3.0, -4.0, 2.0, -3.0, 4.0, -1.0])]       # no clear gain
    with_local = [x + 20 + d for x, d in zip(mixing_only, [1.0, -1.0, 2.0, -2.0, 0.5, -0.5])]
    rows = experiment_rows({"softmax": [55.0] * 6, "linear": linear, "inline (no local)": mixing_only,
                            "inline + local": with_local})
    led = Ledger("t", mode="full")
    record_accuracy_claims(led, rows, cost_ratio=1.1)
    assert led.carried_by("inline-local-beats-linear") == "carried by local-matters"
    with pytest.raises(ValueError, match="cost_ratio must be a positive number"):
        record_accuracy_claims(Ledger("t", mode="full"), rows, cost_ratio=0.0)


def test_fit_seeds_trains_the_tiny_vits_as_fit_does():
    # the chapter trains its seeds batched (vmap over seeds, grouped convolutions of the local term inside): each seed
    # must end with the weights that fit gives it seed by seed
    from paperlab.core import deterministic, seed_everything
    from paperlab.data import digits
    from paperlab.train import fit, fit_seeds
    deterministic(threads=1)
    train = torch.utils.data.Subset(digits(12, "train", seed=0), range(48))
    for mixing, local in (("inline", True), ("linear", False), ("softmax", False)):
        make = lambda seed: tiny_vit(mixing, local, depth=1, img_size=12)
        batched = fit_seeds(make, [0, 5], train, epochs=1, lr=2e-3, batch_size=16)
        for seed, model in zip(batched.seeds, batched.models):
            seed_everything(seed)
            ref = make(seed)
            fit(ref, train, epochs=1, lr=2e-3, batch_size=16, seed=seed, progress=False)
            for name, p in ref.state_dict().items():
                torch.testing.assert_close(model.state_dict()[name], p, atol=2e-5, rtol=1e-4, msg=f"{mixing} seed {seed}: {name}")
