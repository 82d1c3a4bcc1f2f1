"""The shared tiny VLM: tokenizer, boards, the model's sequence layout, visual-token dropping against a masked reference, the aggregated attention by hand, training cache, bad inputs."""
import numpy as np
import pytest
import torch

from paperlab.data import COLOR_NAMES, PALETTE, SHAPE_CLASSES, shape_mask
from paperlab.vlm import (QUESTION_KINDS, GridQAConfig, cell_name, VLM_SIZES, TinyVLM, Vocab, aggregate_attention, attention_map, drop_visual_tokens,
                          generate, grid_question, grid_scene, keep_count, make_qa, sequence_keep_index, top_visual,
                          train_vlm, N_CELL_CLASSES, cell_label, cell_loss, pretrain_vision,
                          reduce_visual_tokens)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return TinyVLM(VLM_SIZES["small"]).eval()


@pytest.fixture(scope="module")
def data():
    return make_qa(6, seed=3)


def test_vocab_round_trip_and_errors():
    v = Vocab()
    for q in ("what colour is the circle", "how many shapes", "where is the red circle", "what shape is it ?"):
        assert v.decode(v.encode(q)) == q
    assert Vocab(words=["grasp"]).encode("grasp") == [len(v)]
    with pytest.raises(ValueError, match="banana"):
        v.encode("banana")


def test_board_pixels_and_relevance():
    rng = np.random.default_rng(5)
    s = grid_scene(rng)
    img = s["image"].permute(1, 2, 0).numpy()
    for (r, c), (shp, colour) in s["cells"].items():
        k = GridQAConfig().cell
        patch = img[r * k:(r + 1) * k, c * k:(c + 1) * k]
        np.testing.assert_allclose(patch[shape_mask(shp, k)], np.broadcast_to(PALETTE[colour], (shape_mask(shp, k).sum(), 3)))
    # every shape class is distinguishable at the board's cell size (at 4 pixels circle and cross coincide)
    assert len({shape_mask(i, GridQAConfig().cell).tobytes() for i in range(len(SHAPE_CLASSES))}) == len(SHAPE_CLASSES)
    q, a, cells = grid_question(s, "count", rng)
    assert sorted(cells) == sorted(r * 6 + c for r, c in s["cells"]) and int(a) == len(s["cells"])
    q, a, cells = grid_question(s, "where", rng)
    (r, c), = [rc for rc, (shp, col) in s["cells"].items() if q.endswith(f"{COLOR_NAMES[col]} {SHAPE_CLASSES[shp]}")]
    assert a == cell_name(r, c) and cells == [r * 6 + c]
    with pytest.raises(ValueError, match="kind"):
        grid_question(s, "size", rng)


def _mask(d):
    return (torch.arange(d.text.shape[1]) < (d.q_len + d.a_len)[:, None]).long()


def test_keep_all_is_exact_and_positions_are_kept(small, data):
    m = _mask(data)
    full = small(data.images, data.text, attention_mask=m).logits
    K = small.cfg.prune_layer
    with drop_visual_tokens(small, torch.arange(36).expand(6, -1), K):
        assert torch.equal(small(data.images, data.text, attention_mask=m).logits, full)
    keep = torch.tensor([[3, 7, 20]] * 6)
    seen = {}

    def spy(mod, args, kwargs):
        seen["pos"], seen["cos"] = kwargs.get("position_ids"), kwargs["position_embeddings"][0]

    h = small.lm.model.layers[K + 1].self_attn.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with drop_visual_tokens(small, keep, K):
            out = small(data.images, data.text, attention_mask=m).logits
    finally:
        h.remove()
    L = 37 + data.text.shape[1]
    expected = torch.cat([torch.tensor([0, 4, 8, 21]), torch.arange(37, L)])
    if seen["pos"] is not None: assert torch.equal(seen["pos"][0], expected)  # original positions, not 0..L'-1
    cos_full, _ = small.lm.model.rotary_emb(torch.zeros(1, L, 1), torch.arange(L)[None])
    torch.testing.assert_close(seen["cos"][0], cos_full[0, expected])  # the rotary angles of the original positions
    assert out.shape[1] == L - 33


def test_pruned_forward_equals_masked_full_forward(small, data):
    """Dropping visual tokens from layer K on = masking them as keys from layer K on (independent computation)."""
    m = _mask(data)
    keep = torch.stack([torch.randperm(36, generator=torch.Generator().manual_seed(i))[:5] for i in range(6)])
    K = small.cfg.prune_layer
    with drop_visual_tokens(small, keep, K):
        pruned = small(data.images, data.text, attention_mask=m).logits
    emb, layout = small.embed(data.images, data.text)
    B, L, _ = emb.shape
    pos = torch.arange(L)[None]
    cs = small.lm.model.rotary_emb(emb, pos)
    allowed_pad = torch.cat([torch.ones(B, 37, dtype=torch.bool), m.bool()], 1)
    vis_kept = torch.ones(B, L, dtype=torch.bool); vis_kept[:, 1:37] = False
    vis_kept[torch.arange(B)[:, None], keep + 1] = True
    h = emb
    for i, layer in enumerate(small.lm.model.layers):
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & allowed_pad[:, None] & (vis_kept[:, None] if i >= K else True)
        h = layer(h, attention_mask=torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min),
                  position_embeddings=cs, position_ids=pos)
    ref = small.lm.lm_head(small.lm.model.norm(h))
    idx = sequence_keep_index(keep, layout, L)
    torch.testing.assert_close(pruned, ref[torch.arange(B)[:, None], idx], atol=1e-5, rtol=1e-5)
    # a different kept set changes the output: the test can fail
    with drop_visual_tokens(small, (keep + 1) % 36, K):
        other = small(data.images, data.text, attention_mask=m).logits
    assert not torch.allclose(other, pruned, atol=1e-4)


def test_aggregation_by_hand_two_layers():
    """Two layers, one head, 5 tokens, visual tokens at 1..2: rows from the last visual token (2) on, summed."""
    a1 = torch.tensor([[1, 0, 0, 0, 0], [.5, .5, 0, 0, 0], [.2, .3, .5, 0, 0], [.1, .2, .3, .4, 0], [.1, .1, .1, .3, .4]])
    a2 = torch.tensor([[1, 0, 0, 0, 0], [.6, .4, 0, 0, 0], [.1, .1, .8, 0, 0], [.3, .3, .2, .2, 0], [.2, .2, .2, .2, .2]])
    att = [a1[None, None], a2[None, None]]
    got = aggregate_attention(att, slice(1, 3))
    hand = torch.tensor([[.3 + .2 + .1 + .1 + .3 + .2, .5 + .3 + .1 + .8 + .2 + .2]])
    torch.testing.assert_close(got, hand)
    torch.testing.assert_close(aggregate_attention(att, slice(1, 3), layers=[1]), torch.tensor([[.1 + .3 + .2, .8 + .2 + .2]]))
    rows = torch.tensor([[1, 1, 1, 1, 0]])  # the last row masked out (a pad)
    torch.testing.assert_close(aggregate_attention(att, slice(1, 3), rows), torch.tensor([[.3 + .2 + .1 + .3, .5 + .3 + .8 + .2]]))


def test_generate_and_attention_map(small, data):
    v = Vocab()
    g = generate(small, data.images, data.questions(), data.q_len, max_new_tokens=3, eos_id=v.eos_id, pad_id=v.pad_id)
    Tq = int(data.q_len.max())
    first = small(data.images, data.questions()[:, :Tq], attention_mask=(torch.arange(Tq) < data.q_len[:, None]).long()
                  ).logits[torch.arange(6), 36 + data.q_len].argmax(-1)
    assert torch.equal(g["ids"][:, 0], first)
    amap = attention_map(small, data.images, g["text"], g["length"], g["n_gen"])
    assert amap.shape == (6, 36) and (amap > 0).all()
    # rows counted: (last visual row) + question + fed-back answer tokens, each row's visual mass <= heads · layers
    assert float(amap.sum(1).max()) <= small.cfg.num_layers * small.cfg.num_heads * (1 + int(g["length"].max()))


def test_retention_and_layer_errors(small):
    with pytest.raises(ValueError, match="retention"): keep_count(36, 0)
    with pytest.raises(ValueError, match="retention"): top_visual(torch.rand(2, 36), 1.01)
    with pytest.raises(ValueError, match="beyond"):
        with drop_visual_tokens(small, torch.arange(3)[None], small.cfg.num_layers): pass
    with pytest.raises(ValueError, match="visual indices"):
        sequence_keep_index(torch.tensor([[40]]), slice(1, 37), 50)
    assert keep_count(36, 0.09) == 3 and keep_count(36, 1.0) == 36


def test_train_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLAB_RESULTS", str(tmp_path))
    d = make_qa(32, seed=0)
    a = train_vlm(VLM_SIZES["small"], d, 2, seed=1, batch_size=8, progress=False)
    assert list(tmp_path.glob("vlm/models/*.pt"))
    b = train_vlm(VLM_SIZES["small"], d, 2, seed=1, batch_size=8, progress=False)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)
    with pytest.raises(ValueError, match="steps"): train_vlm(VLM_SIZES["small"], d, 0)


def test_cell_labels_name_each_cells_content():
    d = make_qa(40, seed=4, kinds=("colour",))
    v = Vocab()
    assert d.cells.shape == (40, 36) and int(d.cells.max()) < N_CELL_CLASSES
    for cells, rel, ans in zip(d.cells, d.relevant, d.answer_ids()):
        label = int(cells[rel][0])  # the one relevant cell holds the shape asked about, of the answer's colour
        assert COLOR_NAMES[(label - 1) % len(COLOR_NAMES)] == v.decode(ans)
    assert ((d.cells > 0).sum(1) >= 2).all()  # the default boards hold two to four shapes
    rng = np.random.default_rng(0)
    s = grid_scene(rng)
    lab = cell_label(s)
    assert {i for i in range(36) if lab[i]} == {r * 6 + c for r, c in s["cells"]}
    with pytest.raises(ValueError, match="kind"): make_qa(4, kinds=("colour", "size"))


def test_vision_pretraining_learns_cells(tmp_path, monkeypatch):
    d = make_qa(64, seed=0)
    cfg = VLM_SIZES["small"]
    torch.manual_seed(0)
    before = TinyVLM(cfg)
    torch.manual_seed(0)
    after = TinyVLM(cfg)
    pretrain_vision(after, d, 40, seed=0, batch_size=32, progress=False)
    head = torch.nn.Linear(cfg.hidden_size, N_CELL_CLASSES)
    # a linear probe fitted on the same few boards does better on the pre-trained visual tokens
    def probe(model):
        with torch.no_grad(): f = model.encode_image(d.images)
        h = torch.nn.Linear(cfg.hidden_size, N_CELL_CLASSES); h.load_state_dict(head.state_dict())
        opt = torch.optim.Adam(h.parameters(), lr=1e-2)
        for _ in range(30):
            loss = cell_loss(f, h, d.cells); opt.zero_grad(); loss.backward(); opt.step()
        return float(loss.detach())
    assert probe(after) < probe(before)
    no_cells = d[:4].__class__(*[getattr(d[:4], k) for k in ("images", "text", "q_len", "a_len", "relevant", "kinds")])
    with pytest.raises(ValueError, match="cell labels"): pretrain_vision(after, no_cells, 1)


def test_projector_alignment_freezes_the_vision_tower():
    torch.manual_seed(0)
    m = TinyVLM(VLM_SIZES["small"])
    d = make_qa(16, seed=0)
    vis = [p.detach().clone() for p in m.vision.parameters()]
    proj = [p.detach().clone() for p in m.projector.parameters()]
    pretrain_vision(m, d, 3, batch_size=8, freeze_vision=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(vis, m.vision.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(proj, m.projector.parameters()))
    assert all(p.requires_grad for p in m.vision.parameters())
    pretrain_vision(m, d, 3, batch_size=8, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(vis, m.vision.parameters()))


def test_staged_training_cache_and_identity_reducer(tmp_path, monkeypatch, small, data):
    monkeypatch.setenv("PAPERLAB_RESULTS", str(tmp_path))
    d = make_qa(32, seed=0)
    a = train_vlm(VLM_SIZES["small"], d, 2, seed=1, batch_size=8, progress=False, vision_steps=2)
    b = train_vlm(VLM_SIZES["small"], d, 2, seed=1, batch_size=8, progress=False, vision_steps=2)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)
    with pytest.raises(ValueError, match="vision_steps"): train_vlm(VLM_SIZES["small"], d, 1, vision_steps=-1)
    # a reducer that keeps every token unchanged is the unpruned model, bit for bit
    mask = (torch.arange(data.text.shape[1]) < (data.q_len + data.a_len)[:, None]).long()
    with torch.no_grad():
        full = small(data.images, data.text, attention_mask=mask).logits
        with reduce_visual_tokens(small, 1, lambda hs, mod, lay: (hs, torch.arange(hs.shape[1]).expand(len(hs), -1))):
            same = small(data.images, data.text, attention_mask=mask).logits
    assert torch.equal(full, same)
