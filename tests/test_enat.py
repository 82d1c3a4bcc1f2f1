"""ENAT chapter: golden outputs of the official code, the spatial and temporal mechanics, the schedule, the sampler, compute counts, full-size parameters, bad inputs."""
import json
import math

import pytest
import torch

from paperlab.core import count_flops, repo_root
from paperlab.enat import (ENAT, GOLDEN_MODEL, ENATBlock, ENATConfig, block_attention, cosine_mask_counts, enat_config,
                           extra_mask, full_size_params, generate, generation_macs, load_golden, masked_inputs, nat_mask,
                           official_name_map)

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
        assert not torch.allclose(m(ids, lab, prev=dict(prev, feat=prev["feat"] + 1.0))["logits"], r)


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
