"""ENAT chapter: golden outputs of the official code and their recipe, the spatial and temporal mechanics, the losses along the schedule (reuse, stale), the untrained controls, the schedule (every step count against the official formula), the sampler, label dropout, compute counts, full-size parameters, bad inputs."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from paperlab.core import count_flops, repo_root
from paperlab.enat import (ENAT, GOLDEN_MODEL, REUSE_MODES, ENATBlock, ENATConfig, block_attention, class_position_table,
                           cosine_mask_counts, enat_config, extra_mask, full_size_params, generate, generation_macs, init_nat,
                           load_golden, masked_inputs, masked_loss, nat_loss, nat_mask, official_name_map, schedule_loss,
                           schedule_losses, schedule_masks, stale_forward, table_loss, train_nat)

TINY = ENATConfig(input_size=4, codebook_size=12, hidden_size=32, num_heads=4, enc_dec=(2, 2), num_classes=3)


def perturbed(cfg=TINY, seed=0):
    "Random weights with the adaLN layers off their zero init (otherwise every block is the identity)."
    torch.manual_seed(seed)
    m = ENAT(cfg).eval()
    for blk in m.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    return m


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, TINY.codebook_size, (2, TINY.seq_len), generator=g)
    ids, mask = nat_mask(x0, TINY.mask_id, g)
    return x0, ids, mask, torch.tensor([0, 2]), g


def test_golden_block_and_model_match_the_official_code():
    G = load_golden()
    blk = ENATBlock(32, 4).double()
    blk.load_state_dict(official_name_map(G["block_state"]))
    with torch.no_grad():
        assert (blk(G["block_x"], G["block_c"]) - G["block_self"]).abs().max() < 1e-12
        assert (blk(G["block_x"], G["block_c"], ctx=G["block_ctx_in"]) - G["block_ctx"]).abs().max() < 1e-12
        assert (blk(G["block_x"], G["block_c"], ctx=G["block_ctx_in"]) - G["block_prev"]).abs().max() < 1e-12
        m = ENAT(ENATConfig(**GOLDEN_MODEL)).double().eval()
        m.load_state_dict(official_name_map(G["model_state"]))
        lab = G["model_labels"].reshape(-1)
        prev = m(G["model_prev_ids"], lab)
        assert (m(G["model_ids"], lab)["logits"] - G["model_plain_logits"]).abs().max() < 1e-12
        assert (m(G["model_ids"], lab, prev=prev)["logits"] - G["model_reuse_logits"]).abs().max() < 1e-12
        # sensitivity: without the reuse the logits differ from the official reuse output
        assert (m(G["model_ids"], lab)["logits"] - G["model_reuse_logits"]).abs().max() > 1e-6


def test_schedule_matches_the_official_generate():
    official = json.loads((repo_root() / "data" / "enat" / "golden" / "schedule_counts.json").read_text())
    for key, counts in official["masked_inputs_per_step"].items():
        n, t = map(int, key.split("x"))
        assert masked_inputs(n, t) == counts
    assert cosine_mask_counts(256, 8) == [251, 236, 212, 181, 142, 97, 49, 0]   # floor(256 cos(π/2 (s+1)/8))


def test_encoder_output_for_visible_tokens_ignores_mask_tokens():
    m = perturbed()
    _, ids, mask, lab, _ = batch()
    with torch.no_grad():
        a = m(ids, lab)["feat"]
        m.x_embedder.word_embeddings.weight[TINY.mask_id] += torch.randn(32)
        b = m(ids, lab)["feat"]
    assert torch.equal(a[~mask], b[~mask]) and (a[mask] - b[mask]).abs().max() > 1e-3


def test_decoder_leaves_visible_features_unchanged():
    m = perturbed()
    _, ids, mask, lab, _ = batch()
    with torch.no_grad():
        feat = m(ids, lab)["feat"]
        h = m.x_embedder(ids)[~mask].reshape(2, -1, 32)
        c = m.y_embedder(lab)
        for blk in m.blocks[:TINY.enc_dec[0]]:
            h = blk(h, c)
    torch.testing.assert_close(feat[~mask], h.reshape(-1, 32), rtol=1e-5, atol=1e-6)


def test_reuse_off_equals_the_plain_forward():
    m = perturbed()
    trace = []
    generate(m, torch.tensor([0, 1]), steps=5, cfg_scale=0.0, reuse=False, generator=torch.Generator().manual_seed(0), trace=trace)
    with torch.no_grad():
        for st in trace:
            assert torch.equal(m(st.ids_in, torch.tensor([0, 1]))["feat"], st.feat)
        # reuse from an all-[MASK] previous step is the plain forward too
        _, ids, _, lab, _ = batch()
        prev = {"feat": torch.randn(2, 16, 32), "masking": torch.ones(2, 16, dtype=torch.bool)}
        torch.testing.assert_close(m(ids, lab, prev=prev)["logits"], m(ids, lab)["logits"])


def test_reuse_changes_output_only_through_previously_visible_tokens():
    m = perturbed()
    x0, ids, mask, lab, g = batch()
    more = extra_mask(mask, g)
    assert (more & ~mask).any() and (mask <= more).all()
    with torch.no_grad():
        prev = m(torch.where(more, TINY.mask_id, x0), lab)
        r = m(ids, lab, prev=prev)["logits"]
        assert torch.equal(m(ids, lab, prev=dict(prev, feat=prev["feat"].masked_fill(more[..., None], 3.0)))["logits"], r)
        # ... and through them it does: noise on the previously visible tokens (a constant shift would vanish in the LayerNorms)
        noise = torch.randn(prev["feat"].shape, generator=torch.Generator().manual_seed(1)) * (~more)[..., None]
        assert (m(ids, lab, prev=dict(prev, feat=prev["feat"] + noise))["logits"] - r).abs().max() > 1e-3


@pytest.mark.parametrize("cfg_scale,reuse", [(0.0, True), (2.5, True), (2.5, False)])
def test_every_token_is_revealed_exactly_once(cfg_scale, reuse):
    m = perturbed()
    trace = []
    out = generate(m, torch.tensor([0, 1, 2]), steps=6, cfg_scale=cfg_scale, reuse=reuse, generator=torch.Generator().manual_seed(3), trace=trace)
    revealed = torch.stack([(s.ids_in == TINY.mask_id) & (s.ids_out != TINY.mask_id) for s in trace])
    assert torch.equal(revealed.sum(0), torch.ones(3, 16, dtype=torch.long))
    assert not any(((s.ids_in != TINY.mask_id) & (s.ids_out == TINY.mask_id)).any() for s in trace)
    assert (out < TINY.codebook_size).all()


def test_sample_replays_from_its_seed():
    m = perturbed()
    run = lambda s: generate(m, torch.tensor([1, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(11), run(11)) and not torch.equal(run(11), run(12))


def test_generation_macs_equal_the_flop_counter():
    m = perturbed()
    for reuse in (True, False):
        fc = count_flops(lambda: generate(m, torch.tensor([0, 1]), steps=6, cfg_scale=2.0, reuse=reuse,
                                          generator=torch.Generator().manual_seed(0))).total
        assert fc == 2 * generation_macs(TINY, 6, guidance=True, reuse=reuse)


def test_full_size_parameters_match_the_official_count():
    p = full_size_params("ENAT-L")   # official code, built here: 565,904,385 (forward) / 574,298,113 (with prev_embedder)
    assert abs(p["forward"] / 565.90e6 - 1) < 0.01 and abs(p["with prev_embedder"] / 574.30e6 - 1) < 0.01
    assert abs(full_size_params("ENAT-B")["with prev_embedder"] / 219e6 - 1) < 0.02        # Table 3: ENAT-B 219M


@pytest.mark.parametrize("name,gflops,reuse", [("NAT-baseline", 39.6, False), ("disentangled-8-8", 40.2, False),
                                               ("disentangled-12-4", 38.2, False), ("disentangled-15-1", 39.8, False),
                                               ("ENAT-S", 22.6, True)])
def test_generation_cost_matches_the_paper_ablation_rows(name, gflops, reuse):
    # Tables 1, 2 and 6a of the paper: GFLOPs of an 8-step guided generation, network only
    assert abs(generation_macs(enat_config(name), 8, True, reuse) / 1e9 / gflops - 1) < 0.05


def test_block_attention_masks():
    mask = torch.tensor([[True, False, False]])
    a = block_attention(mask, "M->V")[0, 0]
    assert a.tolist() == [[True, False, False], [True, True, True], [True, True, True]]
    with pytest.raises(ValueError, match="unknown interaction"):
        block_attention(mask, "X->Y")


@pytest.mark.parametrize("ids,msg", [(torch.full((2, 16), 13), "token id 13"), (torch.full((2, 16), -1), "token id -1"),
                                     (torch.zeros(2, 25, dtype=torch.long), r"\(B, 16\)"),
                                     (torch.zeros(2, 5, 5, dtype=torch.long), "does not match"),
                                     (torch.zeros(2, 16), "integers")])
def test_bad_ids_and_grids_are_clear_errors(ids, msg):
    with pytest.raises(ValueError, match=msg):
        perturbed()(ids, torch.tensor([0, 1]))


def test_bad_configs_labels_and_masks_are_clear_errors():
    m = perturbed()
    with pytest.raises(ValueError, match="class label"):
        m(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"same number of \[MASK\]"):
        m(torch.tensor([[12] * 3 + [0] * 13, [12] * 5 + [0] * 11]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="masks only shrink"):
        m(torch.full((1, 16), 12), torch.tensor([0]), prev={"feat": torch.zeros(1, 16, 32), "masking": torch.zeros(1, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown ENAT config"):
        enat_config("ENAT-XXL")
    with pytest.raises(ValueError, match="no decoder"):
        ENATConfig(enc_dec=(4, 2), uniform=True)
    with pytest.raises(ValueError, match="steps"):
        cosine_mask_counts(256, 0)
    assert math.isclose(sum(masked_inputs(64, 8)), 64 + sum(cosine_mask_counts(64, 8)[:-1]))


def official_counts(seq_len, steps):
    "[MASK] tokens left after each step, written as the official `NATSchedule.generate` computes them (libs/nat_misc.py)."
    out = []
    for step in range(steps):
        ratio = 1. * (step + 1) / steps
        mask_ratio = np.cos(ratio * math.pi * 0.5)
        out.append(math.floor(seq_len * mask_ratio))
    return out


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 7, 8, 16, 32, 64])
def test_mask_counts_follow_the_official_formula_for_every_step_count(side):
    L = side * side
    for steps in range(1, 129):
        ref = official_counts(L, steps)
        assert ref[-1] == 0 and min(ref) >= 0        # the official code decodes every token by the last step
        assert cosine_mask_counts(L, steps) == ref, (L, steps)
        assert masked_inputs(L, steps) == [L] + ref[:-1]


@pytest.mark.parametrize("steps,cfg_scale,reuse", [(13, 0.0, True), (13, 2.0, True), (13, 2.0, False), (26, 0.0, True), (1, 0.0, True)])
def test_generate_leaves_no_mask_token(steps, cfg_scale, reuse):
    # 13 and 26 steps: the old form floor(L cos(pi/2 (s+1)/T)) gave -1 at the last step and re-masked L - 1 tokens
    m = perturbed()
    trace = []
    out = generate(m, torch.tensor([0, 1, 2]), steps=steps, cfg_scale=cfg_scale, reuse=reuse,
                   generator=torch.Generator().manual_seed(4), trace=trace)
    assert not (out == TINY.mask_id).any() and (out < TINY.codebook_size).all()
    assert [(st.ids_out == TINY.mask_id).sum(1).tolist() for st in trace] == [[c] * 3 for c in official_counts(16, steps)]


SMALL = ENATConfig(input_size=2, codebook_size=4, hidden_size=8, num_heads=2, enc_dec=(1, 1), num_classes=3)
N_LAB = 20000


def record_labels(monkeypatch):
    "Patch ENAT.forward to record (train mode?, labels) of every pass."
    calls, forward = [], ENAT.forward

    def spy(self, ids, labels, *args, **kwargs):
        calls.append((self.training, torch.as_tensor(labels).clone()))
        return forward(self, ids, labels, *args, **kwargs)
    monkeypatch.setattr(ENAT, "forward", spy)
    return calls


def near(frac, p, n, z=5.0):
    "A share within z binomial standard deviations sqrt(p(1-p)/n) of p."
    return abs(float(frac) - p) <= z * math.sqrt(p * (1 - p) / n)


def small_data(n=N_LAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.codebook_size, (n, SMALL.seq_len), generator=g), torch.randint(0, SMALL.num_classes, (n,), generator=g)


def test_official_label_dropout_draws_twice(monkeypatch):
    tokens, labels = small_data()
    calls = record_labels(monkeypatch)
    train_nat(SMALL, tokens, labels, steps=1, batch_size=N_LAB, reuse_prob=1.0, progress=False)
    (ema_train, y_reuse), (model_train, y_main) = calls       # the EMA's reuse pass first, then the online model
    assert not ema_train and model_train
    null_reuse, null_main = y_reuse == SMALL.num_classes, y_main == SMALL.num_classes
    # official train.py: CFGDataset(p_uncond=0.15); models.py LabelEmbedder(class_dropout_prob=0.1) in train mode;
    # the EMA runs in eval mode (utils.initialize_train_state), so its pass sees the data's draw only
    assert near(null_reuse.float().mean(), 0.15, N_LAB)
    assert near(null_main.float().mean(), 1 - 0.85 * 0.9, N_LAB)       # 23.5 %
    assert (null_main | ~null_reuse).all()                              # a label dropped in the data stays dropped
    keep = ~null_reuse
    assert near(null_main[keep].float().mean(), 0.1, int(keep.sum()))   # the model's draw is independent of the data's
    assert torch.equal(y_main[~null_main], y_reuse[~null_main])


def test_reuse_pass_through_the_online_model_draws_its_own_labels(monkeypatch):
    # official --ema_for_cond 0: the reuse pass runs the online model in train mode, whose LabelEmbedder draws again
    tokens, labels = small_data()
    torch.manual_seed(0)
    m = ENAT(SMALL).train()
    calls = record_labels(monkeypatch)
    nat_loss(m, tokens, labels, torch.Generator().manual_seed(1), reuse_prob=1.0, ema=None)
    (t1, y1), (t2, y2) = calls
    assert t1 and t2
    d1, d2 = y1 == SMALL.num_classes, y2 == SMALL.num_classes
    assert near(d1.float().mean(), 0.1, N_LAB) and near(d2.float().mean(), 0.1, N_LAB)
    assert near((d1 & d2).float().mean(), 0.01, N_LAB)                 # independent draws: 0.1 × 0.1
    assert torch.equal(y1[~d1], labels[~d1]) and torch.equal(y2[~d2], labels[~d2])


def test_single_label_dropout_option(monkeypatch):
    tokens, labels = small_data()
    calls = record_labels(monkeypatch)
    train_nat(SMALL, tokens, labels, steps=1, batch_size=N_LAB, reuse_prob=1.0, label_dropout="single", progress=False)
    (_, y_reuse), (_, y_main) = calls
    assert torch.equal(y_reuse, y_main)                                 # one draw, shared by both passes
    assert near((y_main == SMALL.num_classes).float().mean(), 0.1, N_LAB)


def test_bad_label_dropout_arguments_are_clear_errors():
    tokens, labels = small_data(64)
    with pytest.raises(ValueError, match="label_dropout"):
        train_nat(SMALL, tokens, labels, steps=1, label_dropout="twice", progress=False)
    with pytest.raises(ValueError, match="p_uncond"):
        train_nat(SMALL, tokens, labels, steps=1, p_uncond=1.5, progress=False)


def golden_recipe(dtype):
    "data/enat/golden/README.md's recipe, drawn with our modules (built in the official order, so the seeded draws line up)."
    G = load_golden()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        blk = ENATBlock(32, 4)
        params = dict(blk.named_parameters())
        with torch.no_grad():
            for name in official_name_map(G["block_state"]):            # the official parameter order
                params[name].normal_(0, 0.2)
        out = {"block_state": blk.state_dict(), "block_x": torch.randn(2, 5, 32), "block_c": torch.randn(2, 32),
               "block_ctx_in": torch.randn(2, 3, 32)}
        torch.manual_seed(1)
        m = ENAT(ENATConfig(**GOLDEN_MODEL))
        with torch.no_grad():
            for b in m.blocks:
                b.adaLN_modulation[-1].weight.normal_(0, 0.2)
                b.adaLN_modulation[-1].bias.normal_(0, 0.2)
        out["model_state"] = m.state_dict()
        torch.manual_seed(2)
        x0 = torch.randint(0, 16, (2, 16))
        order = torch.stack([torch.randperm(16) for _ in range(2)])
        for key, k in (("model_prev_ids", 11), ("model_ids", 6)):          # the first 11 (then 6) of each permutation are [MASK]
            out[key] = torch.where(torch.zeros(2, 16, dtype=torch.bool).scatter_(1, order[:, :k], True), 16, x0)
    finally:
        torch.set_default_dtype(old)
    return G, out


def test_golden_weights_and_inputs_follow_the_readme_recipe():
    G, out = golden_recipe(torch.float64)
    for key in ("block_state", "model_state"):
        ref = official_name_map(G[key])
        assert list(out[key]) == list(ref) and all(torch.equal(out[key][k], ref[k]) for k in ref), key
    for key in ("block_x", "block_c", "block_ctx_in", "model_prev_ids", "model_ids"):
        assert torch.equal(out[key], G[key]), key
    assert G["model_labels"].tolist() == [[3], [7]]
    # the README's earlier recipe drew in float32 (the default dtype): its weights miss the stored ones by about 1.1
    _, f32 = golden_recipe(torch.float32)
    ref = official_name_map(G["block_state"])
    assert max((f32["block_state"][k].double() - ref[k]).abs().max() for k in ref) > 0.5


# --- the losses along the sampler's schedule, the stale ablation and the untrained controls (issue 22)

def tokens_and_labels(n=6, seed=0, cfg=TINY):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (n, cfg.seq_len), generator=g), torch.randint(0, cfg.num_classes, (n,), generator=g)


def test_schedule_masks_hold_the_samplers_counts_each_inside_the_previous():
    masks = schedule_masks(5, 16, steps=6, seed=3)
    assert [m.sum(1).tolist() for m in masks] == [[c] * 5 for c in masked_inputs(16, 6)]   # 16, 15, 13, 11, 8, 4
    assert all((b <= a).all() for a, b in zip(masks[:-1], masks[1:]))                        # a [MASK] only ever leaves
    assert not torch.equal(masks[3], schedule_masks(5, 16, steps=6, seed=4)[3])


def test_schedule_losses_equal_a_step_by_step_reference():
    m = perturbed()
    tok, lab = tokens_and_labels()
    masks = schedule_masks(len(tok), 16, steps=5, seed=2)
    ref = {"none": [], "reuse": [], "stale": []}
    prev = None
    with torch.no_grad():
        for mask in masks:            # generate's chain, written out: each step reads the previous step's reuse output
            ids = torch.where(mask, TINY.mask_id, tok)
            ce = lambda out: torch.nn.functional.cross_entropy(out["logits"][mask], tok[mask]).item()
            out = m(ids, lab, prev=prev)
            ref["none"].append(ce(m(ids, lab)))
            ref["reuse"].append(ce(out))
            ref["stale"].append(ce(out if prev is None else stale_forward(m, ids, lab, prev)))
            prev = out
    got = schedule_losses(m, tok, lab, REUSE_MODES, steps=5, seed=2)
    for mode in REUSE_MODES:
        assert math.isclose(got[mode], sum(ref[mode]) / 5, rel_tol=1e-6), mode
        assert math.isclose(schedule_loss(m, tok, lab, steps=5, reuse=mode, seed=2), got[mode], rel_tol=1e-12)
    assert len({round(v, 6) for v in got.values()}) == 3          # the three modes differ on a model that computes something


def test_stale_forward_never_reads_the_critical_tokens_codes():
    m = perturbed()
    tok, lab = tokens_and_labels(2)
    before, now = schedule_masks(2, 16, steps=6, seed=0)[2:4]     # 13 then 11 [MASK]: 2 critical tokens per row
    critical = before & ~now
    with torch.no_grad():
        prev = m(torch.where(before, TINY.mask_id, tok), lab)
        ids = torch.where(now, TINY.mask_id, tok)
        other = torch.where(critical, (tok + 1) % TINY.codebook_size, ids)   # new codes for the critical tokens only
        stale, stale2 = stale_forward(m, ids, lab, prev), stale_forward(m, other, lab, prev)
        reuse, reuse2 = m(ids, lab, prev=prev), m(other, lab, prev=prev)
    assert torch.equal(stale["logits"][now], stale2["logits"][now])                     # the encoder is skipped
    assert (reuse["logits"][now] - reuse2["logits"][now]).abs().max() > 1e-4            # reuse re-encodes them
    # every visible token, critical ones included, carries its projected previous-step features
    torch.testing.assert_close(stale["feat"][~now], m.prev_proj(prev["feat"])[~now])
    with pytest.raises(ValueError, match="masks only shrink"):
        stale_forward(m, torch.where(before, TINY.mask_id, tok), lab, dict(prev, masking=now))


def test_an_untrained_model_passes_none_of_the_toy_tests():
    # the controls: at the official init the adaLN output layers are zero, every block is the identity, so a [MASK]
    # token reads nothing: reuse, stale and plain give one loss, and blocking an interaction changes nothing
    cfg = replace(TINY, enc_dec=(3, 1))
    tok, lab = tokens_and_labels(cfg=cfg)
    losses = schedule_losses(init_nat(cfg, 5).eval(), tok, lab, REUSE_MODES, steps=6)
    assert losses["none"] == losses["reuse"] == losses["stale"]
    uni = init_nat(replace(TINY, uniform=True, enc_dec=(3, 0)), 5)
    blocked = {b: masked_loss(uni, tok, lab, 0.5, b, seed=1) for b in ("none", "M->V", "V->M")}
    assert blocked["none"] == blocked["M->V"] == blocked["V->M"]
    # sensitivity: with the adaLN layers well off zero the same tests move
    def loud(c):
        "Random weights that compute something and say it loudly: adaLN off zero, unit-scale code embeddings (large logits)."
        m = init_nat(c, 5).eval()
        with torch.no_grad():
            m.x_embedder.word_embeddings.weight.normal_(0, 1)
            for blk in m.blocks: torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=1.0)
        return m
    moved = schedule_losses(loud(cfg), tok, lab, REUSE_MODES, steps=6)
    assert abs(moved["stale"] - moved["reuse"]) > 1e-3 and abs(moved["reuse"] - moved["none"]) > 1e-3
    uni_p = loud(replace(TINY, uniform=True, enc_dec=(3, 0)))
    assert abs(masked_loss(uni_p, tok, lab, 0.5, "M->V", seed=1) - masked_loss(uni_p, tok, lab, 0.5, "none", seed=1)) > 1e-2


def test_init_nat_is_the_model_train_nat_starts_from():
    tok, lab = tokens_and_labels(32)
    run = train_nat(TINY, tok, lab, steps=1, batch_size=8, lr=0.0, seed=7, progress=False)   # lr 0: no step moves a weight
    init = init_nat(TINY, 7).state_dict()
    assert all(torch.equal(run.model.state_dict()[k], v) and torch.equal(run.ema.state_dict()[k], v) for k, v in init.items())
    assert not torch.equal(init_nat(TINY, 8).state_dict()["x_embedder.word_embeddings.weight"], init["x_embedder.word_embeddings.weight"])
    # the betas reach AdamW: the default (official 0.99, 0.99) and the toy's (0.9, 0.99) train different weights
    a = train_nat(TINY, tok, lab, steps=3, batch_size=8, lr=1e-2, seed=7, progress=False).model.state_dict()
    b = train_nat(TINY, tok, lab, steps=3, batch_size=8, lr=1e-2, seed=7, progress=False, betas=(0.9, 0.99)).model.state_dict()
    assert not torch.equal(a["blocks.0.attn.q.weight"], b["blocks.0.attn.q.weight"])


def test_class_position_table_and_its_loss_against_counting():
    tok, lab = tokens_and_labels(40, seed=1)
    table = class_position_table(tok, lab, TINY.codebook_size, TINY.num_classes, alpha=0.5)
    for c in range(TINY.num_classes):
        for j in (0, 7, 15):
            counts = np.full(TINY.codebook_size, 0.5)
            for row, y in zip(tok.tolist(), lab.tolist()):
                if y == c: counts[row[j]] += 1
            np.testing.assert_allclose(table[c, j].exp().numpy(), counts / counts.sum(), rtol=1e-6)
    masks = schedule_masks(len(tok), 16, steps=4, seed=2)
    ref = np.mean([np.mean([-table[lab[i], j, tok[i, j]].item() for i in range(len(tok)) for j in range(16) if m[i, j]]) for m in masks])
    assert math.isclose(table_loss(table, tok, lab, steps=4, seed=2), ref, rel_tol=1e-6)


def test_bad_loss_and_training_arguments_are_clear_errors():
    tok, lab = tokens_and_labels()
    uni = perturbed(replace(TINY, uniform=True, enc_dec=(2, 0)))
    with pytest.raises(ValueError, match="modes must be"):
        schedule_losses(perturbed(), tok, lab, ("cached",))
    with pytest.raises(ValueError, match="modes must be"):
        schedule_losses(perturbed(), tok, lab, ())
    with pytest.raises(ValueError, match="no temporal reuse"):
        schedule_loss(uni, tok, lab, reuse="reuse")
    with pytest.raises(ValueError, match="stale_forward needs an ENAT"):
        stale_forward(uni, tok, lab, {"feat": torch.zeros(6, 16, 32), "masking": torch.ones(6, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="betas"):
        train_nat(TINY, tok, lab, steps=1, betas=(0.9, 1.0), progress=False)
