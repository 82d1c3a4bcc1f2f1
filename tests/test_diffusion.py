"""The shared DiT and its samplers: official initialisation, SiT's SDE sampler, guidance channels, and outside checks against diffusers."""
import math

import pytest
import torch

from paperlab.core import count_params
from paperlab.diffusion import DiT, dit_config, euler_sample, guided_velocity, sde_sample, sde_times, tiny_dit_config
from paperlab.mediators import GaussianToyField


def test_official_initialisation():
    # DiT/SiT `initialize_weights`: xavier-uniform Linear (zero bias), patch embedding as a Linear, N(0, 0.02) time MLP
    # and label table, zeroed adaLN and output layers
    torch.manual_seed(0)
    model = DiT(tiny_dit_config(hidden_size=96, depth=2))
    def xavier_bound(w): return math.sqrt(6 / (w.shape[0] + w[0].numel()))
    for name, w in [("qkv", model.blocks[0].attn.qkv.weight), ("fc1", model.blocks[1].mlp.fc1.weight),
                    ("patch", model.x_embedder.proj.weight)]:
        a = xavier_bound(w)
        assert w.abs().max() <= a and w.abs().max() > 0.9 * a, name                 # uniform on [-a, a]
        assert abs(w.std().item() / (a / math.sqrt(3)) - 1) < 0.1, name
    for b in (model.blocks[0].attn.qkv.bias, model.blocks[0].attn.proj.bias, model.blocks[1].mlp.fc2.bias,
              model.x_embedder.proj.bias, model.t_embedder.mlp[0].bias, model.t_embedder.mlp[2].bias):
        assert torch.count_nonzero(b) == 0
    for w in (model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight, model.y_embedder.weight):
        assert abs(w.std().item() / 0.02 - 1) < 0.1
    for m in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
        assert torch.count_nonzero(m.weight) == 0 and torch.count_nonzero(m.bias) == 0


def test_sde_times_follow_sit():
    t = sde_times(250, 0.04, torch.float64)
    assert t.shape == (250,) and t[0] == 0 and abs(t[-1].item() - 0.96) < 1e-15
    assert abs((t[1] - t[0]).item() - 0.96 / 249) < 1e-15
    with pytest.raises(ValueError, match="steps >= 2"):
        sde_times(1)
    with pytest.raises(ValueError, match="last_step_size"):
        sde_times(10, 1.0)


def test_sde_sampler_reaches_the_data_distribution():
    # exact velocity field of N(mu, 0.5²) data: the SDE's samples must have that mean and spread
    mu = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    field = GaussianToyField(mu, 0.5)
    x = sde_sample(field, torch.zeros(4000, dtype=torch.long), steps=250, generator=torch.Generator().manual_seed(0))
    assert (x.mean(0) - mu[0]).abs().max() < 0.04
    assert (x.std(0) - 0.5).abs().max() < 0.04
    # and the ODE with the same field too
    x = euler_sample(field, torch.zeros(4000, dtype=torch.long), steps=100, generator=torch.Generator().manual_seed(0))
    assert (x.mean(0) - mu[0]).abs().max() < 0.04 and (x.std(0) - 0.5).abs().max() < 0.04


class _Affine(torch.nn.Module):
    "A stand-in model whose output depends on the label: channel c = x_c + (y + 1)·(c + 1)."
    def __init__(self, channels):
        super().__init__()
        self.cfg = tiny_dit_config(in_channels=channels, num_classes=3)
        self.w = torch.nn.Parameter(torch.ones(()))
    def forward(self, x, t, y):
        return x + (y.float() + 1)[:, None, None, None] * torch.arange(1, x.shape[1] + 1.0)[None, :, None, None]


def test_guidance_only_on_the_first_three_channels():
    model, x = _Affine(4), torch.zeros(2, 4, 16, 16)
    y, t = torch.tensor([0, 1]), torch.full((2,), 0.5)
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, 3))
    v = guided_velocity(model, x, t, y, cfg_scale=4.0)
    torch.testing.assert_close(v[:, :3], (v_u + 4.0 * (v_c - v_u))[:, :3])
    torch.testing.assert_close(v[:, 3:], v_c[:, 3:])                 # the 4th latent channel: conditional, unguided
    torch.testing.assert_close(guided_velocity(model, x, t, y, 4.0, guidance_channels=None), v_u + 4.0 * (v_c - v_u))
    # a 1-channel latent (the book's digits): the first 3 channels are all of it
    m1 = _Affine(1)
    torch.testing.assert_close(guided_velocity(m1, x[:, :1], t, y, 4.0), guided_velocity(m1, x[:, :1], t, y, 4.0, None))


def test_euler_sampler_equals_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    torch.manual_seed(0)
    model = DiT(tiny_dit_config(depth=1)).eval()
    for p in model.parameters():                       # leave adaLN-Zero: a non-constant network
        p.data.normal_(0, 0.05)
    y, steps = torch.arange(3), 7
    ours = euler_sample(model, y, steps=steps, generator=torch.Generator().manual_seed(1))
    sched = FlowMatchEulerDiscreteScheduler()          # shift 1: the plain linear interpolant
    import numpy as np
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])    # our grid; diffusers appends the final 0
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(3), y), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def _diffusers_dit(cfg, **kw):
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                                 in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
                                 sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes, **kw)


def test_dit_xl2_parameter_count_against_diffusers():
    cfg = dit_config("DiT-XL/2")
    with torch.device("meta"):
        ours, theirs = count_params(DiT(cfg)), count_params(_diffusers_dit(cfg))
    c, n = cfg.hidden_size, cfg.num_tokens
    # diffusers keeps a timestep + label embedder in every block (official DiT: one, shared), and its fixed position
    # embedding is a buffer (official DiT: a frozen parameter, counted)
    per_embedder = (256 * c + c) + (c * c + c) + (cfg.num_classes + 1) * c
    assert theirs - ours == (cfg.depth - 1) * per_embedder - n * c
    assert ours == 675_129_632            # 675M, Table 4 of the DiT paper (frozen position embedding included)


def _to_diffusers(model, theirs):
    "Copy paperlab DiT weights into a diffusers DiTTransformer2DModel (name map below)."
    sd, cfg = model.state_dict(), model.cfg
    c = cfg.hidden_size
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"], "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[d + f"norm1.emb.timestep_embedder.linear_1.{kind}"] = sd[f"t_embedder.mlp.0.{kind}"]
            out[d + f"norm1.emb.timestep_embedder.linear_2.{kind}"] = sd[f"t_embedder.mlp.2.{kind}"]
            out[d + f"norm1.linear.{kind}"] = sd[o + f"adaLN_modulation.1.{kind}"]
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                out[d + f"attn1.{name}.{kind}"] = sd[o + f"attn.qkv.{kind}"][j * c:(j + 1) * c]
            out[d + f"attn1.to_out.0.{kind}"] = sd[o + f"attn.proj.{kind}"]
            out[d + f"ff.net.0.proj.{kind}"] = sd[o + f"mlp.fc1.{kind}"]
            out[d + f"ff.net.2.{kind}"] = sd[o + f"mlp.fc2.{kind}"]
        out[d + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.weight"]
    missing, unexpected = theirs.load_state_dict(out, strict=False)
    assert not unexpected and all(k.startswith("pos_embed.pos_embed") for k in missing), (missing, unexpected)
    return theirs


def test_dit_equals_diffusers_with_mapped_weights():
    torch.manual_seed(0)
    cfg = tiny_dit_config(depth=2, hidden_size=64, num_heads=4, learn_sigma=True)
    model = DiT(cfg).double().eval()
    for p in model.parameters():                        # random everywhere (adaLN-Zero would hide the blocks)
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    # diffusers' DiT uses eps 1e-5 in its second LayerNorm by default; the official DiT uses 1e-6 everywhere
    theirs = _to_diffusers(model, _diffusers_dit(cfg, norm_eps=1e-6).double().eval())
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 4, 10])                       # 10: the null class
    with torch.no_grad():
        t0 = torch.zeros(3)
        torch.testing.assert_close(theirs(x, t0, y).sample, model(x, t0, y), rtol=0, atol=1e-12)
        t = torch.tensor([0.0, 250.0, 999.0])
        # at t > 0 diffusers' Timesteps(downscale_freq_shift=1) uses frequencies 10000^(−i/(half−1)), DiT 10000^(−i/half)
        assert (theirs(x, t, y).sample - model(x, t, y)).abs().max() > 1e-3
        for blk in theirs.transformer_blocks:
            blk.norm1.emb.time_proj.downscale_freq_shift = 0
        torch.testing.assert_close(theirs(x, t, y).sample, model(x, t, y), rtol=0, atol=1e-12)
