"""DyDiT chapter: golden outputs of the official code, full-size configs against the DiT paper, sliced inference against the masked model, FLOPs against the counter, the official training recipe, bad inputs."""
import numpy as np
import pytest
import torch

from paperlab.core import count_flops
from paperlab.diffusion import DiT, dit_config, tiny_dit_config
from paperlab.core import repo_root
from paperlab.dydit import (BlockGates, DyDiT, DyDiTBlock, block_costs, check_lam, ddpm_scheduler, dydit_config, dydit_from,
                            finetune_dydit, fixed_width_dydit, flops_loss, flops_ratio, lam_schedule, model_cost, noised_batch,
                            official_recipe, paper_numbers, random_cut, router_flops, sample, scaled_recipe, split_timesteps)

NUMBERS = paper_numbers()


@pytest.mark.parametrize("name", sorted(NUMBERS["dit"]))
def test_full_size_config_matches_the_dit_paper(name):
    # DiT paper, Table 4: DiT-S/2 33M / 6.06 G, DiT-B/2 130M / 23.01 G, DiT-XL/2 675M / 118.64 G
    ours, paper = model_cost(name), NUMBERS["dit"][name]
    assert abs(ours["params_M"] / paper["params_M"] - 1) < 0.01
    assert abs(ours["flops_G"] / paper["flops_G"] - 1) < 0.01
    assert ours["dydit_params_M"] > ours["params_M"]                    # the routers add parameters
    cfg = dit_config(name)
    extra = cfg.depth * (2 * (cfg.hidden_size + 1) * (cfg.num_heads - 1)
                         + cfg.hidden_size * (cfg.hidden_size // 16) + cfg.hidden_size // 16 + cfg.hidden_size // 16 + 1)
    assert round((ours["dydit_params_M"] - ours["params_M"]) * 1e6) == extra


@pytest.mark.parametrize("name", sorted(NUMBERS["block_costs_G"]))
def test_block_costs_match_the_official_loss(name):
    a, m = block_costs(dit_config(name))
    off = NUMBERS["block_costs_G"][name]       # official DyDiT/loss.py
    assert a == round(off["attn"] * 1e9) and m == round(off["mlp"] * 1e9)


@pytest.mark.parametrize("lam", [0.5, 0.7])
def test_reported_dynamic_flops_imply_block_ratio_near_lambda(lam):
    # official README: 57.88 G at λ=0.5, 84.33 G at λ=0.7 (static 118.69 G)
    c = model_cost("DiT-XL/2")
    reported = NUMBERS["dydit"][f"DyDiT-XL/2 lam={lam}"]["flops_G"]
    implied = (reported - (c["flops_G"] - c["blocks_G"]) - c["token_router_G"]) / c["blocks_G"]
    assert abs(implied - lam) < 0.03


@pytest.mark.parametrize("lam", [0, -0.5, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None])
def test_lambda_outside_unit_interval_is_refused(lam):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_lam(lam)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dydit_config("DiT-S/2", lam)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        flops_loss(torch.ones(2), lam)


@pytest.mark.parametrize("overrides,msg", [(dict(num_heads=1), "num_heads >= 2"), (dict(mlp_ratio=4.1), "channel groups"),
                                           (dict(token_hidden_ratio=128), "token router"), (dict(tau=0.0), "tau"),
                                           (dict(num_heads=3), "not divisible"), (dict(tdw=False, sdt=False), "tdw=True or sdt=True"),
                                           (dict(sdt=0), "sdt must be True or False"), (dict(tdw="yes"), "tdw must be True or False")])
def test_impossible_configs_are_clear_errors(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        dydit_from(tiny_dit_config(), **overrides)


def test_dydit_needs_a_dydit_config_and_matching_weights():
    with pytest.raises(TypeError, match="DyDiTConfig"):
        DyDiT(tiny_dit_config())
    with pytest.raises(RuntimeError):
        DyDiT.from_dit(DiT(tiny_dit_config(hidden_size=32, num_heads=2)), lam=0.5, hidden_size=64)


def test_bad_inputs():
    model = DyDiT(dydit_from(tiny_dit_config(depth=1))).eval()
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must be \(2,\).*\(3,\)"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must be \(2,\).*\(3,\)"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="y must be integer class ids"):   # a float label is refused, not truncated
        model(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.tensor([2.7, 1.0]))
    with pytest.raises(ValueError, match="all 1 blocks"):
        flops_ratio([], model.cfg)
    with pytest.raises(ValueError, match="steps"):
        finetune_dydit(model, torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), 0.5, steps=0)


def _perturbed_dydit(seed=0, depth=2):
    "A small DyDiT with random non-zero weights and routers that close some heads, groups and tokens."
    torch.manual_seed(seed)
    dit = DiT(tiny_dit_config(depth=depth))
    for p in dit.parameters():
        if p.requires_grad: p.data.add_(0.05 * torch.randn_like(p))
    model = DyDiT.from_dit(dit, lam=0.5).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.head_router.weight.normal_(); blk.group_router.weight.normal_()
            blk.head_router.bias.zero_(); blk.group_router.bias.zero_(); blk.token_router[-1].bias.zero_()
    return dit, model


@pytest.mark.parametrize("t", [999.0, 500.0, 3.0])
def test_sliced_equals_masked_and_flops_match_the_counter(t):
    dit, model = _perturbed_dydit()
    x, y, tt = torch.randn(4, 1, 16, 16), torch.arange(4), torch.full((4,), t)
    with torch.no_grad():
        model.sliced = False; wide = model(x, tt, y)
        model.sliced = True; narrow = model(x, tt, y)
    torch.testing.assert_close(narrow, wide, atol=1e-5, rtol=1e-5)
    model.precompute([t])
    counted = count_flops(model, x[:1], tt[:1], y[:1]).total
    r = flops_ratio(model.gates, model.cfg).item()
    static = count_flops(dit, x[:1], tt[:1], y[:1]).total
    blocks = model.cfg.depth * sum(block_costs(model.cfg))
    assert abs(counted - (static - (1 - r) * blocks + router_flops(model.cfg)[1])) < 1e-6 * counted


def test_all_gates_open_is_the_static_model_exactly():
    torch.manual_seed(0)
    dit = DiT(tiny_dit_config(depth=2))
    for p in dit.parameters():
        if p.requires_grad: p.data.add_(0.05 * torch.randn_like(p))
    model = DyDiT.from_dit(dit).eval()
    model.sliced = False
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 500.0, 900.0]), torch.arange(3)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), dit(x, t, y))
        assert torch.equal(model(x, t, y, complete=True), dit(x, t, y))


def test_flops_ratio_by_hand():
    cfg = dydit_from(tiny_dit_config(depth=2))
    a, m = block_costs(cfg)
    g1 = BlockGates(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[1.0, 1, 0, 0]]), torch.cat([torch.ones(1, 32), torch.zeros(1, 32)], 1))
    g2 = BlockGates(torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 64))
    expected = (a / 4 + m * 0.5 * 0.5 + a + m) / (2 * (a + m))
    assert abs(flops_ratio([g1, g2], cfg).item() - expected) < 1e-6


def test_short_finetune_moves_ratio_down():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # a toy model: two threads on shared cores are many times slower
    try:
        dit = DiT(tiny_dit_config(depth=1, hidden_size=32, num_heads=2))
        model = DyDiT.from_dit(dit, lam=0.3, router_bias=1.0, token_bias=1.0)
        x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
        log, ema = finetune_dydit(model, x, y, 0.3, steps=25, batch_size=8, lr=5e-4, warmup=5, hold=0, router_lr=5e-2,
                                  complete_steps=5, ema_decay=0.5)
    finally:
        torch.set_num_threads(threads)
    assert sum(r["ratio"] for r in log[-5:]) / 5 < sum(r["ratio"] for r in log[:3]) / 3
    assert isinstance(ema, DyDiT) and not ema.training


def test_sliced_block_with_everything_on_is_the_plain_block():
    from paperlab.diffusion import DiTBlock
    from paperlab.dydit import sliced_block_forward
    _, model = _perturbed_dydit()
    blk = model.blocks[0]
    with torch.no_grad():
        blk.token_router[-1].bias.fill_(1e4)       # every token kept
        h, c = torch.randn(3, 64, 64), torch.randn(3, 64)
        every = torch.arange(4)
        torch.testing.assert_close(sliced_block_forward(blk, h, c, every, every), DiTBlock.forward(blk, h, c), atol=1e-5, rtol=1e-5)
        assert blk.gates.tokens.sum().item() == 3 * 64


# ---------------------------------------------------------------- golden outputs of the official code (data/dydit/golden/README.md)
GOLDEN = repo_root() / "data" / "dydit" / "golden"


def _xl_gates(z: dict, flip: bool = False) -> list[BlockGates]:
    "The stored DiT-XL/2 gate pattern as 28 BlockGates in float64 (flip one token gate for the sensitivity check)."
    heads, groups, tokens = (torch.from_numpy(z[k].astype(np.float64)) for k in ("heads", "groups", "tokens"))
    if flip: tokens[0, 5, 17] = 1 - tokens[0, 5, 17]
    return [BlockGates(heads[:, l], groups[:, l], tokens[:, l]) for l in range(heads.shape[1])]


def test_golden_flops_ratio_of_an_xl_gate_pattern():
    # official loss.py DynamicLoss on a fixed DiT-XL/2 pattern, float64
    z = np.load(GOLDEN / "flops_xl.npz")
    cfg = dit_config("DiT-XL/2")
    r = flops_ratio(_xl_gates(z), cfg)
    assert np.abs(r.numpy() - z["ratio_per_sample"]).max() < 1e-12
    assert abs(r.mean().item() - float(z["ratio_mean"])) < 1e-12
    assert abs(2 * flops_loss(r, 0.5).item() - float(z["loss_lam05"])) < 1e-12
    assert abs(2 * flops_loss(r, 0.7).item() - float(z["loss_lam07"])) < 1e-12
    # sensitivity: one token gate of one block flipped moves the ratio far beyond the tolerance
    assert np.abs(flops_ratio(_xl_gates(z, flip=True), cfg).numpy() - z["ratio_per_sample"]).max() > 1e-7


@pytest.mark.parametrize("key,lam,warmup", [("lam0.5_warmup1000", 0.5, 1000), ("lam0.7_warmup5000", 0.7, 5000),
                                            ("lam0.3_warmup1000", 0.3, 1000)])
def test_golden_lambda_schedule(key, lam, warmup):
    # the two statements of the official train.py that set flops_target_ratio, steps 0..6000
    z = np.load(GOLDEN / "lam_schedule.npz")
    ours = np.array([lam_schedule(int(s), lam, warmup) for s in z["steps"]])
    assert np.abs(ours - z[key]).max() < 1e-12
    # sensitivity: the schedule of our earlier version (held for warmup/10 steps, then linear from there) fails
    hold = warmup // 10
    old = np.array([1.0 if s < hold else lam if s >= warmup else 1 + (lam - 1) * (s - hold) / (warmup - hold) for s in z["steps"]])
    assert np.abs(old - z[key]).max() > 1e-3


NAME_MAP = {"attn_rate.router.": "head_router.", "mlp_rate.router.": "group_router.", "token_selection.mlp_head.": "token_router."}


def _golden_block(mask_before_act: bool = True):
    "Our DyDiTBlock holding the official block's stored weights (float64), and the stored arrays."
    z = np.load(GOLDEN / "block.npz")
    state = {}
    for k in z.files:
        if k.startswith("w:"):
            name = k[2:]
            for a, b in NAME_MAP.items(): name = name.replace(a, b)
            state[name] = torch.from_numpy(z[k])
    blk = DyDiTBlock(32, 4, token_hidden_ratio=16, mask_before_act=mask_before_act).double()
    blk.load_state_dict(state, strict=True)
    return blk.eval(), {k: torch.from_numpy(z[k]) for k in z.files if not k.startswith("w:")}


def test_golden_block_forward_gates_and_complete_model():
    blk, g = _golden_block()
    with torch.no_grad():
        out = blk(g["x"], g["c"], g["temb"])
        assert (out - g["out"]).abs().max() < 1e-12
        assert torch.equal(blk.gates.heads, g["heads"]) and torch.equal(blk.gates.groups, g["groups"])
        assert torch.equal(blk.gates.tokens, g["tokens"])
        assert 0 < g["heads"].mean() < 1 and 0 < g["groups"].mean() < 1 and 0 < g["tokens"].mean() < 1   # gates really close
        assert (blk(g["x"], g["c"]) - g["out_complete"]).abs().max() < 1e-12
        blk.mlp.fc2.weight[0, 0] += 1e-6                                                   # sensitivity
        assert (blk(g["x"], g["c"], g["temb"]) - g["out"]).abs().max() > 1e-9


@pytest.mark.parametrize("mask_before_act", [True, False])
def test_golden_mask_gradients_mlp_mask_before_gelu(mask_before_act):
    # the gradient w.r.t. the masks is what reaches a router through its straight-through gate
    blk, g = _golden_block(mask_before_act)
    hmask, gmask = g["hmask"].clone().requires_grad_(), g["gmask"].clone().requires_grad_()
    a, m = blk.attn_masked(g["u"], hmask), blk.mlp_masked(g["u"], gmask)
    assert (a - g["attn_out"]).abs().max() < 1e-12
    assert (m - g["mlp_out"]).abs().max() < 1e-12                       # forward identical either way: GELU(0) = 0
    ((a * g["w"]).sum() + (m * g["w"]).sum()).backward()
    assert (hmask.grad - g["hmask_grad"]).abs().max() < 1e-12
    err = (gmask.grad - g["gmask_grad"]).abs().max()
    if mask_before_act:
        assert err < 1e-12                                              # official placement: same router gradients
    else:
        assert err > 1e-3                                               # after the GELU: other router gradients


# ---------------------------------------------------------------- the official recipe
def test_router_init_is_xavier_with_open_biases():
    blk = DyDiTBlock(384, 6)
    for lin in (blk.head_router, blk.group_router, blk.token_router[0], blk.token_router[2]):
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
    assert torch.all(blk.head_router.bias == 15) and torch.all(blk.group_router.bias == 15)
    assert torch.all(blk.token_router[0].bias == 0) and torch.all(blk.token_router[2].bias == 35)


def test_timestep_split_and_ddpm_noising():
    t = split_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t // 250, torch.arange(4000) % 4) and t.min() == 0 and t.max() == 999
    x0, noise, tt = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 500, 999])
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[tt][:, None, None, None]
    xt, tm, target = noised_batch(x0, tt, noise, "ddpm", ddpm_scheduler())
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-5, rtol=1e-5)   # closed form; diffusers keeps betas in float32
    assert torch.equal(target, noise) and torch.equal(tm, tt.double())


def test_official_recipes_and_scaling():
    r5, r7, r3 = official_recipe(0.5), official_recipe(0.7), official_recipe(0.3)
    assert (r5["lr"], r5["clip"], r5["warmup"], r5["complete_steps"], r5["steps"]) == (1e-4, 200.0, 1000, 30_000, 200_000)
    assert (r7["lr"], r7["clip"], r7["warmup"], r7["complete_steps"], r7["steps"]) == (2.5e-5, 50.0, 5000, 150_000, 150_000)
    assert "no official script" in r3["script"]
    s = scaled_recipe(0.7, 300)
    assert s["complete_steps"] == 300 and s["warmup"] == 10 and abs(s["ema_decay"] - 0.95) < 1e-12   # 10k-step horizon of 150k -> 20 of 300


def test_official_update_takes_two_adam_steps_in_stage_one():
    torch.manual_seed(0)
    dit = DiT(tiny_dit_config(depth=1, hidden_size=32, num_heads=2))
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    runs = {}
    for update, complete in (("official", 1), ("official", 0), ("clip", 1)):
        model = DyDiT.from_dit(dit, lam=0.5)
        before = model.final_layer.linear.weight.detach().clone()      # the only weights with a gradient at adaLN-Zero start
        finetune_dydit(model, x, y, 0.5, steps=1, batch_size=8, lr=1e-3, update=update, complete_steps=complete, ema_decay=0.0)
        runs[update, complete] = (model.final_layer.linear.weight.detach() - before).abs().max().item()
    # Adam's first step moves each weight by about lr; the official stage 1 steps twice on the same gradient
    assert 1.7e-3 < runs["official", 1] < 2.1e-3 and 0.9e-3 < runs["clip", 1] < 1.05e-3
    model = DyDiT.from_dit(dit, lam=0.5)
    log, _ = finetune_dydit(model, x, y, 0.5, steps=2, batch_size=8, clip=1e-9, complete_steps=0)
    assert all(r["skipped"] for r in log)                              # stage 2 skips an update whose norm reaches the limit


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_sampling_dydit_equals_masked_and_is_deterministic(objective):
    _, model = _perturbed_dydit()
    y = torch.arange(3)
    a = sample(model, y, 4, objective, generator=torch.Generator().manual_seed(0))
    b = sample(model, y, 4, objective, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    model.sliced = False
    torch.testing.assert_close(sample(model, y, 4, objective, generator=torch.Generator().manual_seed(0)), a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw,msg", [(dict(objective="edm"), "objective"), (dict(update="sgd"), "update"), (dict(steps=0), "steps")])
def test_finetune_bad_arguments(kw, msg):
    model = DyDiT(dydit_from(tiny_dit_config(depth=1)))
    args = dict(steps=1) | kw
    with pytest.raises(ValueError, match=msg):
        finetune_dydit(model, torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), 0.5, **args)
    with pytest.raises(ValueError, match="warmup"):
        lam_schedule(3, 0.5, warmup=0)


# ---------------------------------------------------------------- Table 3's ablation switches and the random-cut control
def _pushed(model: DyDiT) -> DyDiT:
    "Routers pushed (seeded) so that some heads, groups and tokens close."
    torch.manual_seed(3)
    with torch.no_grad():
        for blk in model.blocks:
            blk.head_router.weight.normal_(); blk.group_router.weight.normal_()
            blk.head_router.bias.zero_(); blk.group_router.bias.zero_(); blk.token_router[-1].bias.zero_()
    model.clear_cache()
    return model


class _Boom(torch.nn.Module):
    "A token scorer that must never run."
    def forward(self, x):
        raise AssertionError("the token scorer ran although SDT is off")


@pytest.mark.parametrize("part", ["tdw", "sdt"])
def test_an_ablated_part_keeps_everything_on_and_costs_what_it_runs(part):
    dit, _ = _perturbed_dydit()
    model = _pushed(DyDiT.from_dit(dit, lam=0.5, **{part: False}).eval())
    x, y, t = torch.randn(4, 1, 16, 16), torch.arange(4), torch.tensor([950.0, 950.0, 400.0, 20.0])
    with torch.no_grad():
        model.sliced = False; wide = model(x, t, y); g_wide = model.gates
        if part == "sdt":
            for blk in model.blocks: blk.token_router = _Boom()       # TDW only: the scorers are not even run, in either path
        model.sliced = True; narrow = model(x, t, y)
    torch.testing.assert_close(narrow, wide, atol=1e-5, rtol=1e-5)
    widths_on = all(bool(g.heads.all() and g.groups.all()) for g in g_wide)
    tokens_on = all(bool(g.tokens.all()) for g in g_wide)
    assert (widths_on, tokens_on) == (part == "tdw", part == "sdt")       # the other part really closes gates
    # the counted multiply-adds of the sliced model, at one timestep, against static − (1 − r)·blocks + the scorers that run
    model.precompute([400.0])
    counted = count_flops(model, x[:1], t[2:3], y[:1]).total
    r = flops_ratio(model.gates, model.cfg).item()
    static = count_flops(dit, x[:1], t[2:3], y[:1]).total
    blocks = model.cfg.depth * sum(block_costs(model.cfg))
    scorers = 0 if part == "sdt" else model.cfg.depth * 64 * (64 * 4 + 4)   # 64 tokens, 64 → 4 → 1 per block
    assert router_flops(model.cfg)[1] == scorers
    assert abs(counted - (static - (1 - r) * blocks + scorers)) < 1e-6 * counted


def test_sdt_only_with_every_token_kept_is_the_static_model():
    dit, _ = _perturbed_dydit()
    model = DyDiT.from_dit(dit, lam=0.5, tdw=False).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.head_router.bias.fill_(-1e4)                              # would close every head, were TDW on
            blk.token_router[-1].bias.fill_(1e4)
        x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 500.0, 900.0]), torch.arange(3)
        torch.testing.assert_close(model(x, t, y), dit(x, t, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("part,router", [("tdw", "head_router"), ("sdt", "token_router")])
def test_fine_tuning_an_ablation_never_moves_the_switched_off_router(part, router):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dit = DiT(tiny_dit_config(depth=1, hidden_size=32, num_heads=2))
        model = DyDiT.from_dit(dit, lam=0.5, router_bias=1.0, token_bias=1.0, **{part: False})
        other = "token_router" if part == "tdw" else "head_router"
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
        x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
        log, _ = finetune_dydit(model, x, y, 0.5, steps=4, batch_size=8, lr=1e-3, router_lr=5e-2, warmup=1, hold=0,
                                complete_steps=0, ema_decay=0.5)
    finally:
        torch.set_num_threads(threads)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if router in n)          # its router never learns
    assert any(not torch.equal(before[n], after[n]) for n in before if other in n)       # the other part's does
    assert all(r["ratio"] < 1 for r in log[1:])


def _cut_reference(dit: DiT, model: DyDiT) -> DiT:
    "The static DiT with the dropped heads' projection columns and the dropped groups' fc2 columns zeroed: a cut by hand."
    ref = __import__("copy").deepcopy(dit)
    d, gs = model.blocks[0].head_dim, model.blocks[0].group_size
    with torch.no_grad():
        for blk_ref, (hi, gi) in zip(ref.blocks, model.width_plan(500.0)):
            for h in set(range(model.cfg.num_heads)) - set(hi.tolist()):
                blk_ref.attn.proj.weight[:, h * d:(h + 1) * d] = 0
            for g in set(range(model.cfg.num_heads)) - set(gi.tolist()):
                blk_ref.mlp.fc2.weight[:, g * gs:(g + 1) * gs] = 0
    return ref


def test_random_cut_is_a_fixed_half_equal_to_zeroing_by_hand():
    dit, _ = _perturbed_dydit(depth=3)
    cut = random_cut(dit, keep=2, seed=5)
    plans = [[(hi.tolist(), gi.tolist()) for hi, gi in cut.width_plan(t)] for t in (999.0, 500.0, 0.0)]
    assert plans[0] == plans[1] == plans[2]                             # the same plan at every timestep
    temb = cut.t_embedder(torch.tensor([999.0, 0.0]))
    for blk in cut.blocks:                                              # its logits do not read the timestep at all
        for router in (blk.head_router, blk.group_router):
            z = router(temb)
            assert torch.equal(z[0], z[1]) and z.abs().min() >= 10
    assert all(h[0] == 0 and g[0] == 0 and len(h) == 2 and len(g) == 2 for h, g in plans[0])
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([999.0, 700.0, 300.0, 0.0]), torch.arange(4)
    with torch.no_grad():
        out = cut(x, t, y)
        assert torch.allclose(flops_ratio(cut.gates, cut.cfg), torch.full((4,), 0.5))
        torch.testing.assert_close(out, _cut_reference(dit, cut)(x, t, y), atol=1e-5, rtol=1e-5)
        assert (out - dit(x, t, y)).abs().max() > 1e-3                   # the cut changes the output
    others = {tuple(map(tuple, (p for hg in [(hi.tolist(), gi.tolist()) for hi, gi in random_cut(dit, 2, s).width_plan(0.0)] for p in hg)))
              for s in range(6)}
    assert len(others) > 1                                              # the seed picks the cut


@pytest.mark.parametrize("kw,msg", [(dict(keep=0), "keep must be"), (dict(keep=5), "keep must be"), (dict(keep=2.0), "keep must be"),
                                    (dict(keep=True), "keep must be")])
def test_random_cut_bad_keep(kw, msg):
    with pytest.raises(ValueError, match=msg):
        random_cut(DiT(tiny_dit_config(depth=1)), seed=0, **kw)


def test_fixed_width_bad_plans():
    dit = DiT(tiny_dit_config(depth=2))
    with pytest.raises(ValueError, match="one head list and one group list per block"):
        fixed_width_dydit(dit, [[0]], [[0]])
    with pytest.raises(ValueError, match="must include 0"):
        fixed_width_dydit(dit, [[1, 2], [0]], [[0], [0]])
    with pytest.raises(ValueError, match="lie in 0..3"):
        fixed_width_dydit(dit, [[0, 4], [0]], [[0], [0]])
