"""SGL chapter: official aggregation and pruning (golden), the official kept count (zero allowed, golden), ToMe against the official code (golden) and by hand, 100 % retention is exact, planted tokens recovered, consistency by hand, full-size counts, bad inputs; the controls (untrained models = training's start, the same measurement as the arm), SGL's ablated maps by hand, the exit-score null, the floor and the official layer's computed reason."""
import itertools
import math

import numpy as np
import pytest
import torch

from paperlab.core import repo_root
from paperlab.sgl import (ABLATIONS, INTERNVL2, METHODS, RANKINGS, UNTRAINED_GUIDE, ablated_scores, aggregated_scores, answer,
                          answer_prior, bipartite_match, build_internvl2, consistency, exit_auc, fuse, has_learnt, keep_count,
                          layer_keys, merge_visual_tokens, merge_wavg, official_layer_reason, prefill_flops,
                          prefill_flops_formula, random_routing, recall_at, run_controls, run_pair, tome_reduce, top_visual,
                          topk_overlap, untrained_vlm)
from paperlab.vlm import (VLM_SIZES, TinyVLM, Vocab, aggregate_attention, drop_visual_tokens, make_qa, sequence_keep_index,
                          train_vlm)

GOLD = repo_root() / "data/sgl/golden/official_aggregation_pruning.npz"
GOLD_ZERO = repo_root() / "data/sgl/golden/official_pruning_zero_kept.npz"


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return TinyVLM(VLM_SIZES["small"]).eval(), TinyVLM(VLM_SIZES["large"]).eval()



def _finish_by_hand(large, h, P, K):
    "Logits of `large` from hidden states `h` (B, L', D) at positions `P` (B, L'), run by hand through layers K.. with a causal mask."
    lm = large.lm.model
    n = P.shape[1]
    cos_sin = lm.rotary_emb(h, P)
    m4 = torch.zeros(h.shape[0], 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(h.dtype).min)
    for layer in lm.layers[K:]:
        h = layer(h, attention_mask=m4, position_embeddings=cos_sin, position_ids=P)
    return large.lm.lm_head(lm.norm(h))

def test_golden_official_aggregation_and_pruning():
    g = np.load(GOLD)
    layout = slice(int(g["v0"]), int(g["v1"]) + 1)
    ours = aggregate_attention(list(torch.from_numpy(g["attentions"])), layout)[0]
    np.testing.assert_allclose(ours.numpy(), g["importance"], rtol=0, atol=1e-12)
    hs = torch.from_numpy(g["hidden_states"])
    for r in (1.0, 0.5, 0.34):
        idx = sequence_keep_index(top_visual(ours[None], r), layout, int(g["prefill"]))[0]
        np.testing.assert_array_equal(idx.numpy(), g[f"keep_{r}"])
        np.testing.assert_array_equal(hs[:, idx].numpy(), g[f"hidden_{r}"])
        np.testing.assert_array_equal(idx[None].numpy(), g[f"position_ids_{r}"])
    # sensitivity: the helper's variant (rows after the last visual token) differs
    late = aggregate_attention([a[:, :, 1:, :] for a in torch.from_numpy(g["attentions"])], slice(layout.start - 1, layout.stop - 1))[0]
    assert np.abs(late.numpy() - g["importance"]).max() > 1e-3


def test_golden_official_kept_count_can_be_zero():
    # modeling_internlm2.py:997 keeps int(n_vis * keep_ratio) visual tokens, no floor at one (official lines run verbatim)
    g, z = np.load(GOLD), np.load(GOLD_ZERO)
    layout = slice(int(g["v0"]), int(g["v1"]) + 1)
    imp, hs = torch.from_numpy(g["importance"]), torch.from_numpy(g["hidden_states"])
    for r in (0.1, 0.16, 0.17):  # 6 visual tokens: 0, 0 and 1 kept
        idx = sequence_keep_index(top_visual(imp[None], r), layout, int(g["prefill"]))[0]
        np.testing.assert_array_equal(idx.numpy(), z[f"keep_{r}"])
        np.testing.assert_array_equal(hs[:, idx].numpy(), z[f"hidden_{r}"])
    assert keep_count(6, 0.16) == 0 and keep_count(6, 0.16, at_least_one=True) == 1
    # the official product is float32 (an int64 tensor times a float): 29 tokens where Python's int(100 * 0.29) gives 28
    assert keep_count(100, 0.29) == len(z["big_keep_0.29"]) - 5 == 29
    big = sequence_keep_index(top_visual(torch.from_numpy(z["big_importance"])[None], 0.29), slice(3, 103), 105)[0]
    np.testing.assert_array_equal(big.numpy(), z["big_keep_0.29"])
    with pytest.raises(ValueError, match="retention"): keep_count(36, 0.0)
    with pytest.raises(ValueError, match="n_vis"): keep_count(0, 0.5)


def test_zero_kept_tokens_run_the_large_model_on_text_alone(pair):
    _, large = pair
    d = make_qa(3, seed=7)
    K, lm = large.cfg.prune_layer, large.lm.model
    keep = top_visual(torch.rand(3, 36, generator=torch.Generator().manual_seed(1)), 0.02)  # int(36 * 0.02) = 0
    assert keep.shape == (3, 0)
    with torch.no_grad():
        with drop_visual_tokens(large, keep, K):
            got = large(d.images, d.text).logits
        # by hand: the input of layer K without its visual tokens, original positions, causal mask, the remaining layers
        emb, layout = large.embed(d.images, d.text)
        h = lm(inputs_embeds=emb, output_hidden_states=True).hidden_states[K]
        B, L = h.shape[:2]
        P = torch.cat([torch.arange(layout.start), torch.arange(layout.stop, L)]).expand(B, -1)
        h = h[:, P[0]]
        ref = _finish_by_hand(large, h, P, K)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # with nothing kept every method answers alike: same accuracy, no recall, an undefined overlap
    small, _ = pair
    res = run_pair(small, large, d, Vocab(), retentions=(0.02,), layer=K)
    accs = [res["acc"][(m, 0.02)] for m in METHODS]
    assert all(torch.equal(a, accs[0]) for a in accs)
    assert all(float(res["recall"][(m, 0.02)].sum()) == 0 for m in RANKINGS)
    assert res["overlap"][0.02].isnan().all()
    assert (top_visual(torch.rand(3, 36), 0.02, at_least_one=True)).shape == (3, 1)  # the option keeps one


def test_full_retention_reproduces_the_unpruned_large_model(pair):
    small, large = pair
    v, d = Vocab(), make_qa(8, seed=4)
    full = answer(large, d, v)
    kept = answer(large, d, v, top_visual(torch.rand(8, 36), 1.0), large.cfg.prune_layer)
    assert torch.equal(full.ids, kept.ids) and torch.equal(full.max_prob, kept.max_prob)
    pruned = answer(large, d, v, top_visual(torch.rand(8, 36), 0.09), large.cfg.prune_layer)
    assert not torch.equal(full.max_prob, pruned.max_prob)


def test_oracle_recovers_planted_tokens():
    g = torch.Generator().manual_seed(2)
    planted = torch.tensor([2, 11, 29])
    logits = torch.randn(4, 1, 2, 50, 50, generator=g)
    logits[..., 1 + planted] += 3.0
    A = logits.masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    scores = aggregate_attention(list(A), slice(1, 37))
    assert torch.equal(top_visual(scores, 3 / 36)[0], planted)
    rel = torch.zeros(1, 36, dtype=torch.bool); rel[0, planted] = True
    assert recall_at(scores, rel, 3 / 36).item() == 1.0
    assert topk_overlap(scores, scores, 0.09).item() == 1.0


def test_consistency_by_hand(pair):
    small, _ = pair
    v, d = Vocab(), make_qa(3, seed=5)
    ans = answer(small, d, v)
    scores = torch.rand(3, 36, generator=torch.Generator().manual_seed(0))
    got = consistency(small, d, ans, scores, ratio=0.05)
    for i in range(3):
        keep = scores[i].topk(keep_count(36, 0.05)).indices.sort().values
        L = int(ans.length[i])
        emb, _ = small.embed(d.images[i:i + 1], ans.text[i:i + 1, :L])
        idx = torch.cat([torch.tensor([0]), keep + 1, torch.arange(37, 37 + L)])
        pos = idx[None]
        logits = small.lm(inputs_embeds=emb[:, idx], position_ids=pos).logits[0].float().softmax(-1)
        q = L - int(ans.n_gen[i])
        k = len(keep)
        prob = torch.prod(torch.stack([logits[k + t, ans.text[i, t]] for t in range(q, L)]))
        torch.testing.assert_close(got[i], prob, rtol=1e-4, atol=1e-7)


def test_full_size_counts_and_flops():
    m = build_internvl2(INTERNVL2["2B"])
    total = sum(p.numel() for p in m.parameters())
    assert abs(total / 2.2e9 - 1) < 0.01  # InternVL2-2B model card: 2.2B
    c = INTERNVL2["2B"]
    lm = m["language_model"]
    assert c.prune_layer == 9 and c.num_image_token == 256
    for r in (1.0, 0.09):
        kept = 45 + keep_count(256, r)
        assert prefill_flops(lm, r, c.prune_layer) == prefill_flops_formula(c, 301, kept, c.prune_layer)
    with pytest.raises(ValueError, match="retention"): prefill_flops(lm, 1.5, c.prune_layer)


def test_bad_inputs(pair):
    small, large = pair
    v, d = Vocab(), make_qa(2, seed=6)
    with pytest.raises(ValueError, match="beyond"): run_pair(small, large, d, v, layer=large.cfg.num_layers)
    with pytest.raises(ValueError, match="retention"): run_pair(small, large, d, v, retentions=(0.0,))
    with pytest.raises(ValueError, match="fuse"): fuse(torch.ones(1), torch.ones(1), "max")
    assert RANKINGS[0].startswith("SGL")


def test_tome_golden_and_by_hand():
    g = np.load(repo_root() / "data/sgl/golden/official_tome.npz")
    metric, x, size = (torch.from_numpy(g[k]) for k in ("metric", "x", "size"))
    for r in (0, 2, 5, 9):
        y, s = merge_wavg(x, size, *bipartite_match(metric, r))
        np.testing.assert_array_equal(y.numpy(), g[f"x_r{r}"])
        np.testing.assert_array_equal(s.numpy(), g[f"size_r{r}"])
    # two tokens with the same key direction merge into their size-weighted mean; the result sits in B's slot
    xh = torch.tensor([[[4.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mh = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, -1.0]]])
    y, s = merge_wavg(xh, torch.tensor([[[3.0], [1.0], [1.0], [1.0]]]), *bipartite_match(mh, 1))
    torch.testing.assert_close(y, torch.tensor([[[0.0, 1.0], [3.25, 0.0], [5.0, 5.0]]]))
    assert s.flatten().tolist() == [1.0, 4.0, 1.0]
    torch.testing.assert_close(merge_wavg(xh, torch.ones(1, 4, 1), *bipartite_match(mh, 0))[0], xh)
    y, s, pos = tome_reduce(xh, lambda v: v, 2)
    assert pos.tolist() == [[1, 3]] and s.flatten().tolist() == [2.0, 2.0]  # token 0 joins token 1, token 2 joins token 3
    torch.testing.assert_close(y, torch.tensor([[[2.5, 0.0], [2.5, 3.0]]]))
    with pytest.raises(ValueError, match="k=5"): tome_reduce(xh, lambda v: v, 5)


def test_tome_in_the_language_model_matches_a_manual_merge(pair):
    _, large = pair
    d = make_qa(3, seed=7)
    K, lm = large.cfg.prune_layer, large.lm.model
    with torch.no_grad():
        with merge_visual_tokens(large, 5, K):
            got = large(d.images, d.text).logits
        emb, layout = large.embed(d.images, d.text)
        h = lm(inputs_embeds=emb, output_hidden_states=True).hidden_states[K]  # the input of layer K
        vis, _, pos = tome_reduce(h[:, layout], lambda v: layer_keys(lm.layers[K], v), 5)
        B, L = h.shape[:2]
        h = torch.cat([h[:, :1], vis, h[:, layout.stop:]], 1)
        P = torch.cat([torch.zeros(B, 1, dtype=torch.long), pos + 1, torch.arange(layout.stop, L).expand(B, -1)], 1)
        assert (P.diff(1) > 0).all()  # merged tokens sit at their B token's position, in order
        ref = _finish_by_hand(large, h, P, K)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_untrained_control_is_where_training_starts():
    # the control model is the trained model at step 0: one AdamW step at lr 1e-12 moves no weight by more than ~1e-12
    d = make_qa(8, seed=2)
    one_step = train_vlm(VLM_SIZES["small"], d, 1, seed=3, lr=1e-12, cache=False, progress=False).state_dict()
    start, other = untrained_vlm("small", 3).state_dict(), untrained_vlm("small", 4).state_dict()
    assert one_step.keys() == start.keys()
    assert max(float((one_step[k] - start[k]).abs().max()) for k in start) < 1e-9
    assert max(float((other[k] - start[k]).abs().max()) for k in start) > 1e-2   # another seed starts elsewhere
    with pytest.raises(ValueError, match="unknown size"): untrained_vlm("medium", 0)


def test_ablated_maps_by_hand(pair):
    small, _ = pair
    v, d = Vocab(), make_qa(5, seed=9)
    ans = answer(small, d, v, max_new_tokens=3)
    full = aggregated_scores(small, d, ans)
    n_vis, L = small.cfg.n_vis, small.cfg.num_layers
    # prompt rows alone, by hand: a forward pass on the question only, rows from the last visual token to the last prompt token
    with torch.no_grad():
        mask = (torch.arange(d.text.shape[1]) < d.q_len[:, None]).long()
        att = small(d.images, d.questions(), attention_mask=mask, output_attentions=True).attentions
    ref = torch.stack([sum(att[l][i, :, n_vis:n_vis + 1 + int(d.q_len[i]), 1:1 + n_vis].sum((0, 1)) for l in range(L))
                       for i in range(len(d))])
    torch.testing.assert_close(ablated_scores(small, d, ans, "answer"), ref, rtol=1e-5, atol=1e-6)
    # one layer at a time: the layers' maps add up to SGL's map, and no single layer is it
    per_layer = [ablated_scores(small, d, ans, "layers", l) for l in range(L)]
    torch.testing.assert_close(sum(per_layer), full, rtol=1e-5, atol=1e-5)
    assert all((p - full).abs().max() > 1e-3 for p in per_layer)
    with pytest.raises(ValueError, match="part must be"): ablated_scores(small, d, ans, "heads")
    with pytest.raises(ValueError, match="beyond the model's depth"): ablated_scores(small, d, ans, "layers", L)


def test_controls_are_the_same_measurement(pair):
    # run with the trained models in place of the untrained ones, each control must equal the arm it controls
    small, large = pair
    v, d = Vocab(), make_qa(6, seed=11)
    res = run_pair(small, large, d, v, retentions=(0.09,), seed=5, layer=1)
    c = run_controls(small, large, small, large, d, v, res, seed=5)
    assert torch.equal(c["acc"][(UNTRAINED_GUIDE, 0.09)], res["acc"][(RANKINGS[0], 0.09)])
    assert torch.equal(c["overlap"], res["overlap"][0.09])
    for name in (RANKINGS[1], RANKINGS[2]): assert torch.equal(c["recall"][name], res["recall"][(name, 0.09)])
    assert torch.equal(c["large"], res["large"]) and torch.equal(c["random"], res["acc"][(RANKINGS[3], 0.09)])
    # correctness is all False for untrained models: the answers' probabilities show the same tokens at the same layer
    same_arm = {UNTRAINED_GUIDE: RANKINGS[0], "untrained large, random": RANKINGS[3]}
    for arm, ranking in same_arm.items():
        ref = answer(large, d, v, top_visual(res["scores"][ranking], 0.09), 1)
        assert torch.equal(c["answers"][arm].max_prob, ref.max_prob), arm
    assert torch.equal(c["answers"]["untrained large"].max_prob, res["answers"]["large"].max_prob)
    assert set(c["acc"]) == {(n, 0.09) for n in (*ABLATIONS, UNTRAINED_GUIDE)}


def test_exit_auc_by_hand_and_its_null():
    ok_s, ok_l = torch.tensor([True, False, True, False]), torch.tensor([True, True, False, True])
    dec = torch.tensor([1.01, 0.02, 1.03, 0.04])  # the small model's wrong answers score lowest: they are routed first
    see, rnd = exit_auc(dec, ok_s, ok_l)
    assert math.isclose(see, 0.25 * ((0.5 + 0.75) / 2 + (0.75 + 1) / 2 + 1 + (1 + 0.75) / 2), abs_tol=1e-12)
    assert math.isclose(rnd, (random_routing(0, ok_s, ok_l) + random_routing(1, ok_s, ok_l)) / 2, abs_tol=1e-12)
    # the shuffled-score control: over every permutation the score's area averages to random routing's, exactly
    perms = [exit_auc(dec[list(p)], ok_s, ok_l)[0] for p in itertools.permutations(range(4))]
    assert math.isclose(float(np.mean(perms)), rnd, abs_tol=1e-12) and max(perms) == see
    with pytest.raises(ValueError, match="one entry per question"): exit_auc(dec[:3], ok_s, ok_l)


def test_floor_and_the_official_layers_reason():
    # Wilson lower end by hand (z = 1.959964): 12/20 → 0.3866, 9/20 → 0.2582
    z = 1.959963984540054
    def lower(k, n):
        p = k / n
        return (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert abs(lower(12, 20) - 0.3866) < 1e-4 and abs(lower(9, 20) - 0.2582) < 1e-4
    assert has_learnt(torch.arange(20) < 12, 0.38) and not has_learnt(torch.arange(20) < 12, 0.39)
    assert not has_learnt(torch.zeros(20, dtype=torch.bool), 0.0)   # a model right on nothing has learnt nothing
    with pytest.raises(ValueError, match="non-empty"): has_learnt(torch.zeros(0, dtype=torch.bool), 0.1)
    # the best constant answer: three copies of one question and one with another answer → 3/4
    v, d = Vocab(), make_qa(12, seed=1)
    ans = [v.decode(a) for a in d.answer_ids()]
    j = next(k for k in range(1, 12) if ans[k] != ans[0])
    assert answer_prior(d[[0, 0, 0, j]], v) == 0.75 and answer_prior(d[[0, 0]], v) == 1.0
    # quick mode's case: a large model right on nothing gets no story about the text tokens, and no 'nan'
    why = official_layer_reason(2, 2, False, 0.0, 0.271, 1.0, float("nan"))
    assert "not learnt" in why and "0.271" in why and "text tokens" not in why and "nan" not in why
    assert "text tokens" in official_layer_reason(2, 0, True, 0.9, 0.25, 1.0, 1.0)
    why = official_layer_reason(2, 0, True, 0.9, 0.25, 0.97, 0.95)
    assert "97.0%" in why and "no ranking" not in why and "layer 0" in why
    assert "nan" not in official_layer_reason(2, 0, True, 0.9, 0.25, 1.0, float("nan"))
