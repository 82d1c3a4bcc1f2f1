"""Attention Mediators chapter: full-size configs against the official counts, linear cost, bad inputs."""
import pytest
import torch

from paperlab.attention import mediator_attention
from paperlab.core import count_flops
from paperlab.diffusion import DiT, tiny_dit_config
from paperlab.mediators import MediatorAttention, dynamic_euler_sample, mediator_grid, model_cost, paper_numbers

COUNTED = paper_numbers()["counted"]


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


def test_dynamic_sampler_rejects_bad_settings():
    models = [DiT(tiny_dit_config(depth=1)), DiT(tiny_dit_config(depth=1))]
    y = torch.arange(2)
    with pytest.raises(ValueError, match="one switch ratio per switch"):
        dynamic_euler_sample(models, [], y, steps=5)
    with pytest.raises(ValueError, match=">= 0"):
        dynamic_euler_sample(models, [-0.5], y, steps=5)
    with pytest.raises(ValueError, match="first_several"):
        dynamic_euler_sample(models, [0.5], y, steps=3, first_several=3)


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
