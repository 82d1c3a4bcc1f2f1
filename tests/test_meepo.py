"""MEEPO chapter: serialisation against PTv3's official outputs, Hilbert adjacency, grid sampling against Pointcept, Mamba block
against mamba-ssm, mixer properties (causality, reversal, strided order, padding), spconv against a gather reference, pooling,
patch attention against a naive loop, PTv3's voxelisation (model.py Point.serialization) against its official output, the
padding cache, the full-size parameter count, and bad inputs."""
import json

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F

from paperlab.core import count_params, repo_root
from paperlab.meepo import (ORDERS, MambaMixer, PointUNet, PointUNetConfig, ptv3_state_to_ours, SSMBranch, SerializedAttention, SerializedPooling,
                            accuracy_by_position, decode, encode, fnv_hash, grid_sample, hilbert_decode, hilbert_encode,
                            inverse_permutation, load_mamba_ssm_state, make_point_cloud, make_scene, pack, patch_padding,
                            ptv3_base, scene_batch, serialize, strided_order, submconv_reference, tiny_config, voxelise,
                            z_order_decode, z_order_encode)
from paperlab.ssm import selective_scan_sequential

GOLD = np.load(repo_root() / "data/meepo/golden/ptv3_mamba_golden.npz")


# ---- serialisation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_golden_encode(order):
    # PTv3 serialization/default.py encode at commit 3229e9b, depth 6, batch packed above 18 bits
    gc, gb = torch.from_numpy(GOLD["ser_grid_coord"]), torch.from_numpy(GOLD["ser_batch"])
    np.testing.assert_array_equal(encode(gc, gb, 6, order).numpy(), GOLD[f"ser_code_{order}"])
    np.testing.assert_array_equal(encode(gc, None, 6, order).numpy(), GOLD[f"ser_code_nobatch_{order}"])
    swapped = "z" if order == "z-trans" else "hilbert" if order == "hilbert-trans" else None
    if swapped:
        np.testing.assert_array_equal(encode(gc[:, [1, 0, 2]], gb, 6, swapped).numpy(), GOLD[f"ser_code_{order}"])
    assert (encode(gc, gb, 6, order).numpy() != GOLD[f"ser_code_{ORDERS[(ORDERS.index(order) + 1) % 4]}"]).any()  # sensitivity


def test_golden_depth16_and_curves():
    c16 = torch.from_numpy(GOLD["ser16_grid_coord"])
    for o in ("z", "hilbert"):
        np.testing.assert_array_equal(encode(c16, torch.full((64,), 3), 16, o).numpy(), GOLD[f"ser16_code_{o}"])
    full = torch.arange(512)
    np.testing.assert_array_equal(z_order_decode(full, 3).numpy(), GOLD["decode_full8_z"])
    np.testing.assert_array_equal(hilbert_decode(full, 3).numpy(), GOLD["decode_full8_hilbert"])


@pytest.mark.parametrize("depth", [1, 2, 4, 5])
def test_hilbert_face_adjacent_on_full_grid(depth):
    coords = hilbert_decode(torch.arange(8 ** depth), depth)
    assert len(torch.unique(coords, dim=0)) == 8 ** depth                  # a bijection onto the grid
    assert (coords.diff(dim=0).abs().sum(1) == 1).all()                    # consecutive voxels share a face
    np.testing.assert_array_equal(hilbert_encode(coords, depth).numpy(), np.arange(8 ** depth))


@pytest.mark.parametrize("enc,dec", [(z_order_encode, z_order_decode), (hilbert_encode, hilbert_decode)])
def test_round_trip(enc, dec):
    g = torch.Generator().manual_seed(0)
    for depth in (3, 10, 16):
        c = torch.randint(0, 2 ** depth, (300, 3), generator=g)
        torch.testing.assert_close(dec(enc(c, depth), depth), c)
        b = torch.randint(0, 7, (300,), generator=g)
        for o in ("z", "hilbert"):
            back, bb = decode(encode(c, b, depth, o), depth, o)
            torch.testing.assert_close(back, c); torch.testing.assert_close(bb, b)


def test_batch_contiguous_and_shuffle():
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 64, (400, 3), generator=g)
    b = torch.sort(torch.randint(0, 5, (400,), generator=g)).values
    code, order, inv, depth = serialize(c, b, ORDERS, shuffle=True, generator=g)
    assert depth == 6
    for k in range(4):
        assert (b[order[k]].diff() >= 0).all()
        torch.testing.assert_close(order[k][inv[k]], torch.arange(400))
    plain = serialize(c, b, ORDERS)[0]
    assert sorted(map(tuple, code.tolist())) == sorted(map(tuple, plain.tolist()))   # the same codes, permuted orders


def test_serialisation_errors():
    with pytest.raises(ValueError, match="order"): encode(torch.zeros(3, 3, dtype=torch.long), order="peano")
    with pytest.raises(ValueError, match="lie in"): encode(torch.tensor([[0, 0, 64]]), depth=6)
    with pytest.raises(ValueError, match="integer"): encode(torch.zeros(3, 3), depth=6)
    with pytest.raises(ValueError, match="depth"): encode(torch.zeros(3, 3, dtype=torch.long), depth=17)


# ---- grid sampling -------------------------------------------------------------------------------------------------
def test_golden_grid_sample():
    # Pointcept transform.py GridSample(grid_size=0.25, hash_type="fnv", mode="test") at commit d74c646
    pts = torch.from_numpy(GOLD["gs_coord"])
    index, voxels, inverse = grid_sample(pts, 0.25)
    assert set(map(tuple, voxels.tolist())) == set(map(tuple, GOLD["gs_part0_grid_coord"].tolist()))
    assert int(torch.bincount(inverse).max()) == int(GOLD["gs_num_parts"])
    grid = torch.floor(pts / 0.25).long(); grid -= grid.min(0).values
    np.testing.assert_array_equal(fnv_hash(grid).numpy(), GOLD["gs_fnv_hash"])
    assert (fnv_hash(grid + 1).numpy() != GOLD["gs_fnv_hash"]).all()          # sensitivity
    torch.testing.assert_close(voxels[inverse], grid)
    torch.testing.assert_close(grid[index], voxels)


def test_grid_sample_random_mode_keeps_one_point_per_voxel():
    pts = torch.rand(500, 3, generator=torch.Generator().manual_seed(0))
    i1, v1, inv = grid_sample(pts, 0.2, mode="random", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(inv[i1], torch.arange(len(v1)))


@pytest.mark.parametrize("coord,msg", [(torch.zeros(0, 3), "empty"), (torch.tensor([[0.0, float("inf"), 0.0]]), "non-finite"),
                                       (torch.tensor([[0.0, 1.0, float("nan")], [0, 0, 0]]), "non-finite"),
                                       (torch.zeros(5, 2), r"\(N, 3\)")])
def test_bad_clouds(coord, msg):
    with pytest.raises(ValueError, match=msg): grid_sample(coord, 0.1)
    with pytest.raises(ValueError, match=msg): make_point_cloud(coord, torch.zeros(len(coord), 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="grid_size"): grid_sample(torch.zeros(3, 3), 0.0)
    with pytest.raises(ValueError, match="grid_size"): voxelise(torch.zeros(3, 3), -0.1)
    with pytest.raises(ValueError, match=r"grid_coord must be an integer \(N=4, 3\)"):
        make_point_cloud(torch.rand(4, 3), torch.rand(4, 3), grid_coord=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="grid_coord must be an integer"):
        make_point_cloud(torch.rand(4, 3), torch.rand(4, 3), grid_coord=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"grid_coord must lie in \[0"):
        make_point_cloud(torch.rand(4, 3), torch.rand(4, 3), grid_coord=-torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="feat"): make_point_cloud(torch.rand(5, 3), torch.rand(4, 3))
    with pytest.raises(ValueError, match="grouped"): make_point_cloud(torch.rand(4, 3), torch.rand(4, 3), torch.tensor([1, 0, 0, 1]))


# ---- voxelisation inside the model ---------------------------------------------------------------------------------
def test_golden_voxelise():
    # PTv3 model.py Point.serialization (commit 3229e9b), coord + grid_size without grid_coord: data/meepo/golden/voxelise.npz
    gv = np.load(repo_root() / "data/meepo/golden/voxelise.npz")
    coord, batch, gs = torch.from_numpy(gv["coord"]), torch.from_numpy(gv["batch"]), float(gv["grid_size"])
    pc = make_point_cloud(coord, torch.zeros(len(coord), 1), batch, gs, tuple(gv["orders"]), shuffle_orders=False)
    np.testing.assert_array_equal(pc.grid_coord.numpy(), gv["grid_coord"])
    np.testing.assert_array_equal(pc.code.numpy(), gv["code"])
    assert pc.depth == int(gv["depth"])
    # the official formula written out independently (numpy, float32 as the coords): subtract the batch's min, then truncate
    c = gv["coord"]
    np.testing.assert_array_equal(pc.grid_coord.numpy(), np.trunc((c - c.min(0)) / np.float32(gs)).astype(np.int64))
    floor_first = np.floor(c / np.float32(gs)).astype(np.int64); floor_first -= floor_first.min(0)
    assert (floor_first != gv["grid_coord"]).any(1).sum() > 1000                 # sensitivity: the floor-first form moves points


def test_voxelise_offset_cloud():
    # a cloud offset by 0.013 on a grid of 0.05 (the case): the voxel boundaries start at the smallest coordinate
    coord = torch.rand(4000, 3, generator=torch.Generator().manual_seed(5)) * 2 + 0.013
    expect = np.trunc((coord.numpy() - coord.numpy().min(0)) / np.float32(0.05)).astype(np.int64)
    np.testing.assert_array_equal(voxelise(coord, 0.05).numpy(), expect)
    np.testing.assert_array_equal(make_point_cloud(coord, torch.zeros(4000, 1), grid_size=0.05).grid_coord.numpy(), expect)


def test_given_grid_coord_is_used_as_is():
    # as PTv3's Point: grid_coord present -> no voxelisation, no shift
    coord = torch.rand(50, 3, generator=torch.Generator().manual_seed(0))
    grid = torch.randint(3, 20, (50, 3), generator=torch.Generator().manual_seed(1))
    pc = make_point_cloud(coord, torch.zeros(50, 1), grid_size=0.1, orders=("z",), shuffle_orders=False, grid_coord=grid)
    torch.testing.assert_close(pc.grid_coord, grid)
    torch.testing.assert_close(pc.code[0], z_order_encode(grid, pc.depth))


def test_scene_batch_one_point_per_voxel():
    # Pointcept's pipeline: GridSample's per-cloud grid_coord goes to the model; no two kept points share a voxel
    scenes = [make_scene(s) for s in range(3)]
    pc, y = scene_batch(scenes, 0.1)
    keys = torch.cat([pc.batch[:, None], pc.grid_coord], 1)
    assert len(torch.unique(keys, dim=0)) == len(keys)
    start = 0
    for b, s in enumerate(scenes):
        idx, voxels, _ = grid_sample(s["coord"], 0.1)
        torch.testing.assert_close(pc.grid_coord[start:start + len(idx)], voxels)
        torch.testing.assert_close(y[start:start + len(idx)], s["label"][idx])
        start += len(idx)
    assert start == len(pc.batch)


# ---- mixers --------------------------------------------------------------------------------------------------------
def test_golden_mamba_block():
    # mamba_ssm 2.3.2.post1 Mamba(d_model=16, d_state=4, d_conv=4, expand=2), slow path with selective_scan_ref
    gm = np.load(repo_root() / "data/meepo/golden/mamba_block.npz")
    state = {k[len("mamba_param_"):]: torch.from_numpy(gm[k]) for k in gm.files if k.startswith("mamba_param_")}
    x, ref = torch.from_numpy(gm["mamba_x"]), torch.from_numpy(gm["mamba_out"])
    with torch.no_grad():
        torch.testing.assert_close(load_mamba_ssm_state(MambaMixer(16, 4, 4, 2), state)(x), ref, atol=1e-5, rtol=1e-4)
        state["dt_proj.bias"] = state["dt_proj.bias"].flip(0)                  # sensitivity
        assert (load_mamba_ssm_state(MambaMixer(16, 4, 4, 2), state)(x) - ref).abs().max() > 1e-3


def _x(L=40, seed=0):
    return torch.randn(2, L, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_causal_ignores_later_inputs():
    torch.manual_seed(0)
    x = _x(); x2 = x.clone(); x2[:, 20:] = torch.randn(2, 20, 16)
    causal = MambaMixer(16, 4, causal=True)
    torch.testing.assert_close(causal(x)[:, :20], causal(x2)[:, :20], atol=0, rtol=0)
    assert (causal(x)[:, 20:] - causal(x2)[:, 20:]).abs().max() > 1e-3
    free = MambaMixer(16, 4, causal=False); free.load_state_dict(causal.state_dict())
    assert (free(x)[:, 19] - free(x2)[:, 19]).abs().max() > 1e-4            # the centred conv sees t+1, t+2
    bi = MambaMixer(16, 4, causal=True, directions=((False, 1), (True, 1)))
    assert (bi(x)[:, 0] - bi(x2)[:, 0]).abs().max() > 1e-6                  # the backward scan carries the end to the start


@torch.no_grad()
@pytest.mark.parametrize("stride,L", [(1, 37), (2, 40), (4, 40), (8, 48)])
def test_tied_bidirectional_is_reversal_equivariant(stride, L):
    torch.manual_seed(1)
    m = MambaMixer(16, 4, causal=False, directions=((False, stride), (True, stride)), tie=True)
    x = _x(L)
    torch.testing.assert_close(m(x.flip(1)), m(x).flip(1), atol=2e-6, rtol=1e-5)
    untied = MambaMixer(16, 4, causal=False, directions=((False, stride), (True, stride)))
    assert (untied(x.flip(1)) - untied(x).flip(1)).abs().max() > 1e-4         # untied weights break the symmetry


@pytest.mark.parametrize("L,n", [(10, 3), (16, 4), (17, 8), (5, 7), (1, 2), (0, 3)])
def test_strided_order_is_a_permutation(L, n):
    p = strided_order(L, n)
    assert sorted(p.tolist()) == list(range(L))
    torch.testing.assert_close(p[inverse_permutation(p)], torch.arange(L))
    torch.testing.assert_close(inverse_permutation(p)[p], torch.arange(L))
    assert p.tolist() == sorted(range(L), key=lambda i: (i % n, i // n))


@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 3])
def test_branch_equals_scan_over_permuted_sequence(stride):
    torch.manual_seed(2)
    br = SSMBranch(8, d_state=3, d_conv=4, dt_rank=2).double()
    x = torch.randn(2, 8, 30, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.float64)
    out = br(x, mask, causal=False, stride=stride)
    u = F.silu(br.conv1d(x)[..., 2:32])                                     # centred window t-1..t+2 for d_conv 4
    dt, B, C = torch.split(br.x_proj(u.transpose(1, 2)), [2, 3, 3], -1)
    delta = F.softplus(br.dt_proj(dt)).transpose(1, 2)
    p = torch.tensor(sorted(range(30), key=lambda i: (i % stride, i // stride)))
    y = selective_scan_sequential(u[..., p], delta[..., p], -torch.exp(br.A_log), B.transpose(1, 2)[..., p], C.transpose(1, 2)[..., p], br.D)
    ref = torch.empty_like(y); ref[..., p] = y
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    if stride == 1:                                                          # stride 1 is the plain scan
        plain = selective_scan_sequential(u, delta, -torch.exp(br.A_log), B.transpose(1, 2), C.transpose(1, 2), br.D)
        torch.testing.assert_close(out, plain, atol=1e-10, rtol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("causal,directions", [(True, ((False, 1),)), (False, ((False, 1), (True, 1))), (False, ((False, 4), (True, 4))),
                                               (True, ((False, 3), (True, 3)))])
def test_padding_changes_nothing(causal, directions):
    torch.manual_seed(3)
    m = MambaMixer(16, 4, causal=causal, directions=directions)
    x = _x(33)
    xp = torch.cat([x, 100 * torch.randn(2, 11, 16)], 1)                     # garbage in the padded slots
    mask = (torch.arange(44) < 33).expand(2, -1)
    out = m(xp, mask)
    torch.testing.assert_close(out[:, :33], m(x), atol=1e-5, rtol=1e-4)
    assert (out[:, 33:] == 0).all()


def test_pack_pads_each_cloud():
    b = torch.tensor([0, 0, 0, 1, 2, 2])
    x = torch.arange(6.0)[:, None]
    padded, mask, flat = pack(x, b)
    assert padded.shape == (3, 3, 1) and mask.sum(1).tolist() == [3, 1, 2]
    torch.testing.assert_close(padded.reshape(-1, 1)[flat], x)


def test_mixer_errors():
    with pytest.raises(ValueError, match="x must be"): MambaMixer(16)(torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="mask"): MambaMixer(16)(torch.zeros(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="stride"): MambaMixer(16, directions=((False, 0),))
    with pytest.raises(ValueError, match="direction"): MambaMixer(16, directions=())
    with pytest.raises(ValueError, match="stride"): strided_order(5, 0)


# ---- PTv3 pieces ---------------------------------------------------------------------------------------------------
def test_spconv_matches_gather_reference():
    torch.manual_seed(0)
    vox = torch.unique(torch.randint(0, 9, (250, 3)), dim=0)
    x = torch.randn(len(vox), 3, requires_grad=True)
    conv = spconv.SubMConv3d(3, 4, 3, bias=False, indice_key="t")
    sp = spconv.SparseConvTensor(x, torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox], 1).int(), [12] * 3, 1)
    y = conv(sp).features
    ref = submconv_reference(x, vox, conv.weight)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad(y.sum(), x); (g2,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    assert (submconv_reference(x, vox.flip(1), conv.weight) - y).abs().max() > 1e-3   # sensitivity


def test_pooling_parents_are_coarse_voxels():
    torch.manual_seed(0)
    pc = make_point_cloud(torch.rand(300, 3) * 2, torch.randn(300, 4), torch.cat([torch.zeros(100), torch.ones(200)]).long(), 0.1,
                          shuffle_orders=False)
    coarse = SerializedPooling(4, 4, shuffle_orders=False)(pc)
    keys = torch.cat([pc.batch[:, None], pc.grid_coord >> 1], 1)
    assert len(coarse.batch) == len(torch.unique(keys, dim=0))
    torch.testing.assert_close(torch.cat([coarse.batch[:, None], coarse.grid_coord], 1)[coarse.cluster], keys)
    assert (coarse.code[0].diff() > 0).all()                                   # parents in order of the first code
    torch.testing.assert_close(coarse.code[0], torch.unique(pc.code[0] >> 3))  # parents' codes are the children's prefixes
    for k in range(4):
        assert (coarse.code[k][coarse.order[k]].diff() > 0).all()
        assert (coarse.batch[coarse.order[k]].diff() >= 0).all()


def test_patch_padding():
    counts = torch.tensor([10, 4, 7])
    pad, unpad = patch_padding(counts, 4)
    assert len(pad) == 12 + 4 + 8 and len(unpad) == 21
    starts = [0, 10, 14]
    for i, (s, c) in enumerate(zip(starts, counts.tolist())):
        torch.testing.assert_close(pad[unpad[s:s + c]], torch.arange(s, s + c))   # every real point sits at its place
    assert set(pad[:12].tolist()) == set(range(10)) and set(pad[16:].tolist()) == set(range(14, 21))  # padding stays in its cloud


@torch.no_grad()
def test_attention_padding_cached_per_patch_size():
    # our cache is keyed by the patch size: a second attention with another patch size on the same cloud must not reuse the
    # first one's padding (PTv3's single `pad` key would; its released configs never mix patch sizes on one stage)
    torch.manual_seed(0)
    grid = torch.unique(torch.randint(0, 8, (60, 3)), dim=0)[:60]
    def cloud(): return make_point_cloud(grid.float(), torch.randn(len(grid), 8, generator=torch.Generator().manual_seed(2)),
                                         grid_size=1.0, orders=("hilbert",), shuffle_orders=False, grid_coord=grid)
    a16, a8 = SerializedAttention(8, 2, patch_size=16), SerializedAttention(8, 2, patch_size=8)
    assert len(grid) % 16 and len(grid) % 8                                   # both need padding, differently placed
    shared = cloud()
    a16(shared.feat, shared, 0)
    fresh = cloud()
    torch.testing.assert_close(a8(shared.feat, shared, 0), a8(fresh.feat, fresh, 0))
    assert set(shared.cache) == {("pad", 16), ("pad", 8)}


@torch.no_grad()
def test_serialized_attention_equals_naive_patches():
    torch.manual_seed(0)
    pc = make_point_cloud(torch.rand(64, 3), torch.randn(64, 8), grid_size=0.01, shuffle_orders=False)
    n = len(pc.batch)
    attn = SerializedAttention(8, 2, patch_size=16)
    out = attn(pc.feat, pc, 0)
    K = min(n, 16)
    pad, _ = patch_padding(torch.tensor([n]), K)
    seq = pc.order[0][pad]
    qkv = attn.qkv(pc.feat)
    expect = torch.empty(n, 8)
    for s in range(0, len(seq), K):
        idx = seq[s:s + K]
        q, k, v = qkv[idx].reshape(K, 3, 2, 4).permute(1, 2, 0, 3)
        o = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
        expect[idx] = o.transpose(0, 1).reshape(K, 8)
    torch.testing.assert_close(out, attn.proj(expect), atol=1e-5, rtol=1e-5)


def test_full_size_parameter_count():
    # official PointTransformerV3() (commit 3229e9b) + 20-class head: data/meepo/golden/ptv3_param_count.json; paper: 46.2M
    official = json.loads((repo_root() / "data/meepo/golden/ptv3_param_count.json").read_text())["plus_seg_head_20"]
    with torch.device("meta"):
        n = count_params(PointUNet(ptv3_base()))
        assert count_params(PointUNet(ptv3_base(enc_channels=(32, 64, 128, 256, 256)))) != official   # sensitivity
    assert n == official
    assert abs(n / 46.2e6 - 1) < 0.01, n


def test_tiny_model_forward_and_backward():
    torch.manual_seed(0)
    scene = make_scene(3)
    idx, voxels, _ = grid_sample(scene["coord"], 0.1)
    for mixer in ("attention", "mamba", "none"):
        model = PointUNet(tiny_config(mixer))
        pc = make_point_cloud(scene["coord"][idx], scene["normal"][idx], grid_size=0.1, orders=("hilbert",), shuffle_orders=False,
                              grid_coord=voxels)
        out = model(pc)
        assert out.shape == (len(idx), 6) and torch.isfinite(out).all()
        out.sum().backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert unused == [] if mixer != "none" else all(".norm1." in n for n in unused)   # local only: no mixer, its norm idle


def test_local_module_ablation():
    # cpe=False drops xCPE from every block: per block a 3^3 sparse conv (27 C^2, bias C), a Linear (C^2 + C) and a
    # LayerNorm (2C), i.e. 28 C^2 + 4 C; the tiny U-Net has blocks of C = 24 (encoder and decoder) and C = 48
    drop = sum(28 * c * c + 4 * c for c in (24, 48, 24))
    assert drop == 97152
    torch.manual_seed(0); with_cpe = PointUNet(tiny_config("mamba"))
    torch.manual_seed(0); without = PointUNet(tiny_config("mamba", cpe=False))
    assert count_params(with_cpe) - count_params(without) == drop
    assert not any("cpe" in n for n, _ in without.named_parameters())
    # the ablated network equals the full one with its local modules silenced (cpe_norm's output forced to 0)
    without.load_state_dict({k: v for k, v in with_cpe.state_dict().items() if "cpe" not in k})
    scene = make_scene(3)
    idx, voxels, _ = grid_sample(scene["coord"], 0.1)
    def run(model):
        return model(make_point_cloud(scene["coord"][idx], scene["normal"][idx], grid_size=0.1, orders=("hilbert",),
                                      shuffle_orders=False, grid_coord=voxels))
    with torch.no_grad():
        before = run(with_cpe)
        for name, p in with_cpe.named_parameters():
            if "cpe_norm" in name: p.zero_()
        torch.testing.assert_close(run(without), run(with_cpe))
    assert (before - run(without)).abs().max() > 1e-3          # sensitivity: the local modules do change the output
    out = run(without); out.sum().backward()
    assert [n for n, p in without.named_parameters() if p.grad is None] == []


def test_scene_labels_need_context():
    for seed in range(5):
        s = make_scene(seed)
        z, lab = s["coord"][:, 2], s["label"]
        if (lab == 2).any(): assert z[lab == 2].min() < 0.05                    # tables stand on the floor
        if (lab == 3).any(): assert z[lab == 3].min() > 0.4                     # boxes float


def test_accuracy_by_position():
    pred = torch.tensor([2, 3, 3, 2, 0]); y = torch.tensor([2, 2, 3, 3, 0]); pos = torch.tensor([0.1, 0.3, 0.6, 0.9, 0.5])
    np.testing.assert_allclose(accuracy_by_position(pred, y, pos, bins=2), [50.0, 50.0])
    np.testing.assert_allclose(accuracy_by_position(pred, y, pos, bins=4)[[0, 2]], [100.0, 100.0])


@torch.no_grad()
def test_golden_ptv3_forward():
    # PTv3 model.py PointTransformerV3 (commit 3229e9b), small config, train mode, torch.manual_seed(2) before the forward;
    # the official run was given grid_coord (so it never voxelised), and so is PointUNet
    gf = np.load(repo_root() / "data/meepo/golden/ptv3_forward.npz")
    cfg = PointUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(str(gf["config"])).items()
                             if k not in ("enable_flash", "upcast_attention", "upcast_softmax")})
    state = ptv3_state_to_ours({k[6:]: torch.from_numpy(gf[k]) for k in gf.files if k.startswith("param/")}, cfg)

    def run(state):
        model = PointUNet(cfg); model.load_state_dict(state); model.train()
        pc = make_point_cloud(torch.from_numpy(gf["coord"]).float(), torch.from_numpy(gf["feat"]), torch.from_numpy(gf["batch"]),
                              0.05, cfg.order, shuffle_orders=False, grid_coord=torch.from_numpy(gf["grid_coord"]))
        torch.manual_seed(2)
        return model(pc)
    ref = torch.from_numpy(gf["out"])
    torch.testing.assert_close(run(state), ref, atol=1e-4, rtol=1e-4)
    bad = dict(state)                                                        # sensitivity: swap two blocks' qkv biases
    bad["enc.0.0.mixer.qkv.bias"], bad["dec.1.1.mixer.qkv.bias"] = state["dec.1.1.mixer.qkv.bias"], state["enc.0.0.mixer.qkv.bias"]
    assert (run(bad) - ref).abs().max() > 1e-2


@pytest.mark.skipif(not (torch.cuda.is_available() and __import__("paperlab.ssm").ssm.has_cuda_kernel()),
                    reason="needs CUDA and mamba-ssm's compiled selective_scan_cuda")
def test_cuda_mixer_kernel_equals_chunked(monkeypatch):
    import paperlab.ssm
    torch.manual_seed(0)
    mixer = MambaMixer(48, d_state=16, causal=False, directions=((False, 1), (True, 2))).cuda()
    x = torch.randn(2, 700, 48, device="cuda")
    mask = torch.ones(2, 700, dtype=torch.bool, device="cuda"); mask[1, 500:] = False
    with torch.no_grad():
        y_kernel = mixer(x, mask)
        monkeypatch.setattr(paperlab.ssm, "has_cuda_kernel", lambda: False)
        y_torch = mixer(x, mask)
    torch.testing.assert_close(y_kernel, y_torch, atol=1e-4 * float(y_torch.abs().max()), rtol=1e-3)
