"""DyDiT chapter: full-size configs against the DiT paper, sliced inference against the masked model, FLOPs against the counter, bad inputs."""
import pytest
import torch

from paperlab.core import count_flops
from paperlab.diffusion import DiT, dit_config, tiny_dit_config
from paperlab.dydit import (BlockGates, DyDiT, block_costs, check_lam, dydit_config, dydit_from, finetune_dydit,
                            flops_loss, flops_ratio, lam_schedule, model_cost, paper_numbers, router_flops)

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
                                           (dict(num_heads=3), "not divisible")])
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
    with pytest.raises(ValueError, match="t and y"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(3), torch.zeros(2, dtype=torch.long))
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


def test_lambda_schedule_and_short_finetune_moves_ratio_down():
    assert [lam_schedule(s, 0.3, 20) for s in (0, 1, 2, 20, 30)] == [1.0, 1.0, 1.0, 0.3, 0.3]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # a toy model: two threads on shared cores are many times slower
    try:
        dit = DiT(tiny_dit_config(depth=1, hidden_size=32, num_heads=2))
        model = DyDiT.from_dit(dit, lam=0.3, router_bias=1.0, token_bias=1.0)
        x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
        log = finetune_dydit(model, x, y, 0.3, steps=25, batch_size=8, warmup=5, router_lr=5e-2)
    finally:
        torch.set_num_threads(threads)
    assert sum(r["ratio"] for r in log[-5:]) / 5 < sum(r["ratio"] for r in log[:3]) / 3


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
