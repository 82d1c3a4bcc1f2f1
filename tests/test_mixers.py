"""Token-mixer comparison (40_mixers): each wrapped mixer against an independent computation, the task generator against
a reading of its boards, the exponent fit against known exponents, the Pareto front, parameter matching, seed
batching of the wrapped mixers, and bad input."""
import math

import numpy as np
import pytest
import torch

from paperlab.attention import (inline_attention_weights, linear_attention_weights, mediator_attention_weights, merge_heads,
                                softmax_attention_weights, split_heads)
from paperlab.core import count_flops, count_params
from paperlab.meepo import MambaMixer
from paperlab.mixers import (COLOURS, FEATURES, MIXERS, RING, SHIFT, MixerNet, cost_exponent, exponent_interval, frame_boards,
                             make_mixer, matched_hidden, min_distance, mlp_params, pareto_front, time_interleaved,
                             zorder_permutation)
from paperlab.train import fit_seeds, fit_seeds_reference

DIM, HEADS = 32, 2
# vmap has no batching rule for the CPU flash-attention kernel and warns; its fallback (a loop over seeds) is exact
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def board_input(side, batch=2, seed=0):
    "Random float64 tokens (batch, side², DIM)."
    return torch.randn(batch, side * side, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def projections(att, x, weights):
    "qkv -> weights(q, k) @ v -> merge -> proj: an attention module written with its explicit N×N matrix."
    q, k, v = split_heads(att.qkv(x), att.num_heads)
    return att.proj(merge_heads(weights(q, k) @ v))


def block_means(q, side, m):
    "Mediators by hand: the mean of q over each of the √M×√M grid blocks, by explicit loops over the blocks."
    g = math.isqrt(m)
    s = side // g
    grid = q.reshape(*q.shape[:2], side, side, q.shape[-1])
    return torch.stack([grid[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s].mean((2, 3)) for i in range(g) for j in range(g)], 2)


def morton(r, c, bits=8):
    "2-D Morton code by hand: bit i of r goes to bit 2i+1, bit i of c to bit 2i."
    return sum((((r >> i) & 1) << (2 * i + 1)) | (((c >> i) & 1) << (2 * i)) for i in range(bits))


# --- the mixers equal their references ------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [8, 16])
@pytest.mark.parametrize("name,weights", [("softmax", softmax_attention_weights), ("linear", linear_attention_weights),
                                          ("InLine", inline_attention_weights)])
def test_attention_mixers_equal_their_explicit_matrix(name, weights, side):
    torch.manual_seed(side)
    att = make_mixer(name, DIM, HEADS, side).double()
    x = board_input(side)
    with torch.no_grad():
        assert (att(x) - projections(att, x, weights)).abs().max() < 1e-10
        # sensitivity: the wrong matrix is far off
        other = linear_attention_weights if name != "linear" else softmax_attention_weights
        assert (att(x) - projections(att, x, other)).abs().max() > 1e-4


@pytest.mark.parametrize("m", [4, 16, 64])
@pytest.mark.parametrize("side", [8, 16])
def test_mediator_mixing_equals_implied_matrix_with_block_mean_mediators(m, side):
    torch.manual_seed(m)
    att = make_mixer(f"mediators M={m}", DIM, HEADS, side).double()
    x = board_input(side, seed=m)
    with torch.no_grad():
        ref = projections(att, x, lambda q, k: mediator_attention_weights(q, k, block_means(q, side, m)))
        assert (att(x) - ref).abs().max() < 1e-10
        shuffled = projections(att, x, lambda q, k: mediator_attention_weights(q, k, block_means(q, side, m).flip(2) * 1.5))
        assert (att(x) - shuffled).abs().max() > 1e-6


def window_reference(att, x, side, shift):
    "Softmax attention by an explicit loop over the 4×4 windows of the board rolled by `shift` (wrapping), no SDPA."
    q, k, v = split_heads(att.qkv(x), att.h)
    r, c = np.divmod(np.arange(side * side), side)
    win = ((r + shift) % side // 4) * side + (c + shift) % side // 4
    out = torch.zeros_like(q)
    for w in np.unique(win):
        idx = torch.from_numpy(np.flatnonzero(win == w))
        a = torch.softmax(q[:, :, idx] @ k[:, :, idx].transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        out[:, :, idx] = a @ v[:, :, idx]
    return att.proj(merge_heads(out))


@pytest.mark.parametrize("side", [8, 16])
@pytest.mark.parametrize("index", [0, 1])
def test_window_attention_is_attention_inside_aligned_4x4_windows(side, index):
    torch.manual_seed(index)
    win = make_mixer("window", DIM, HEADS, side, index=index).double()
    x = board_input(side, seed=index)
    with torch.no_grad():
        assert (win(x) - window_reference(win.mixer, x, side, SHIFT * index)).abs().max() < 1e-10
        # the other block's windows (shifted or not) give another output: the shift is real
        assert (win(x) - window_reference(win.mixer, x, side, SHIFT * (1 - index))).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["scan causal", "scan bidirectional", "scan strided"])
def test_scans_run_the_module_along_the_z_curve(name):
    torch.manual_seed(0)
    sc = make_mixer(name, DIM, HEADS, 8).double()
    assert isinstance(sc.mixer, MambaMixer)
    x = board_input(8)
    order = sorted(range(64), key=lambda i: morton(i // 8, i % 8))        # the curve, by hand
    p = torch.tensor(order)
    with torch.no_grad():
        assert (sc(x)[:, p] - sc.mixer(x[:, p])).abs().max() < 1e-12
        # raster order instead of the curve gives another output
        assert (sc(x) - sc.mixer(x)).abs().max() > 1e-4
    causal = MIXERS[name].build(DIM, HEADS, 8, 0).mixer.causal
    later = x.clone()
    later[:, p[40:]] += 1.0
    with torch.no_grad():
        change_before = (sc(x) - sc(later))[:, p[:40]].abs().max().item()
    assert (change_before == 0.0) if causal else (change_before > 1e-4)


def test_zorder_permutation_is_the_2d_morton_order_and_windows_are_squares():
    for side in (4, 8, 16, 32):
        by_hand = sorted(range(side * side), key=lambda i: morton(i // side, i % side))
        assert zorder_permutation(side).tolist() == by_hand
    for shift in (0, 2):
        p = zorder_permutation(16, shift)
        rr, cc = (p // 16 + shift) % 16, (p % 16 + shift) % 16
        for w in range(0, 256, 16):
            assert len(set((rr[w:w + 16] // 4).tolist())) == 1 and len(set((cc[w:w + 16] // 4).tolist())) == 1


def test_mixer_macs_match_closed_forms():
    # one layer, N tokens, C = 32, 2 heads of d = 16: qkv 3NC², proj NC², softmax 2N²C, linear/InLine 2NCd (+ N·H·d: the normaliser)
    n, c, d = 256, DIM, DIM // HEADS
    x = torch.randn(1, n, c)
    proj = 4 * n * c * c
    expect = {"softmax": proj + 2 * n * n * c, "InLine": proj + 2 * n * c * d, "linear": proj + 2 * n * c * d + n * c,
              "mediators M=16": proj + 4 * n * 16 * c, "window": proj + 2 * n * 16 * c}
    for name, want in expect.items():
        assert count_flops(make_mixer(name, c, HEADS, 16), x).total == want, name


# --- the task -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [6, 8, 12, 32])
def test_frame_boards_say_what_the_task_says(side):
    x, y = frame_boards(200, side, seed=5)
    assert x.shape == (200, side * side, FEATURES) and y.dtype == torch.int64
    for xb, yb in zip(x, y):
        grid = np.full((side, side), -1)
        col = xb[:, :COLOURS].numpy()
        has = col.sum(1) > 0
        assert set(np.unique(col.sum(1))) <= {0.0, 1.0}                        # at most one colour per cell
        grid.reshape(-1)[has] = col[has].argmax(1)
        (a,), (b,) = (np.flatnonzero(xb[:, COLOURS + j].numpy()) for j in (0, 1))
        a, b = divmod(int(a), side), divmod(int(b), side)
        assert grid[a] == -1 and grid[b] == -1 and int(has.sum()) == side * side - 2
        assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= min_distance(side)
        assert all(grid[b[0] + dy, b[1] + dx] == int(yb) for dy, dx in RING)
        counts = np.bincount(grid[grid >= 0], minlength=COLOURS)
        assert counts.max() - counts.min() <= 1


def test_frame_boards_histogram_does_not_tell_the_answer():
    x, y = frame_boards(4000, 8, seed=9)
    guess = x[..., :COLOURS].sum(1).argmax(-1)
    acc = (guess == y).float().mean().item()
    assert abs(acc - 0.25) < 0.03, acc                                        # chance: 1 in 4 colours
    assert abs(np.bincount(y.numpy(), minlength=COLOURS) / 4000 - 0.25).max() < 0.03


def test_frame_boards_are_fixed_by_their_seed():
    a, b = frame_boards(10, 8, seed=1), frame_boards(10, 8, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], frame_boards(10, 8, seed=2)[0])


@pytest.mark.parametrize("kwargs,name", [(dict(n=0, side=8), "n"), (dict(n=3, side=5), "side"), (dict(n=3, side=8.0), "side"),
                                         (dict(n=3, side=8, seed=-1), "seed"), (dict(n=True, side=8), "n")])
def test_frame_boards_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be a whole number"):
        frame_boards(**kwargs)


# --- backbone, parameter matching, seed batching ---------------------------------------------------------------------

def test_every_arm_has_the_parameters_of_a_softmax_block_within_one_mlp_unit():
    target = count_params(MixerNet("softmax", 8))
    for name in MIXERS:
        net = MixerNet(name, 8)
        assert abs(count_params(net) - target) <= 2 * (2 * DIM + 1), name          # one MLP unit per block, 2 blocks
        assert count_params(MixerNet(name, 16)) == count_params(net)               # no parameter depends on N
    assert matched_hidden("softmax") == 4 * DIM and mlp_params(DIM, 4) == 4 * (2 * DIM + 1) + DIM


def test_matched_hidden_leaves_the_callers_rng_alone():
    torch.manual_seed(3); a = torch.rand(3)
    torch.manual_seed(3); matched_hidden("scan strided"); b = torch.rand(3)
    assert torch.equal(a, b)


def test_answer_is_read_at_marker_a_only():
    torch.manual_seed(0)
    net = MixerNet("window", 8).eval()
    x, _ = frame_boards(1, 8, seed=3)
    a = int(x[0, :, COLOURS].nonzero()[0, 0])
    moved = x.clone()
    moved[0, a, COLOURS] = 0.0
    moved[0, (a + 1) % 64, COLOURS] = 1.0
    with torch.no_grad():
        assert (net(x) - net(moved)).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"MixerNet expects boards \(B, 64, 6\)"):
        net(torch.zeros(2, 63, FEATURES))


@pytest.mark.parametrize("name", ["window", "scan strided", "mediators M=16", "InLine + local"])
def test_seed_batched_training_equals_seed_by_seed_in_float64(name):
    x, y = frame_boards(32, 8, seed=11)
    kw = dict(epochs=1, lr=5e-3, batch_size=16, weight_decay=0.05)
    make = lambda seed: MixerNet(name, 8).double()
    batched = fit_seeds(make, [0, 1], (x.double(), y), **kw)
    plain = fit_seeds_reference(make, [0, 1], (x.double(), y), **kw)
    diff = max((p - q).abs().max().item() for a, b in zip(batched.models, plain.models)
               for p, q in zip(a.parameters(), b.parameters()))
    assert diff < 1e-10, diff
    assert (batched.models[0].head.weight - batched.models[1].head.weight).abs().max() > 1e-3


def test_unknown_mixer_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown mixer 'flash'"):
        make_mixer("flash", DIM, HEADS, 8)
    with pytest.raises(ValueError, match="perfect square"):
        make_mixer("mediators M=4", DIM, HEADS, 8).__class__(DIM, HEADS, 8)


def test_serialized_refuses_another_board_size():
    with pytest.raises(ValueError, match=r"built for a 8×8 board \(64 tokens\), got 256"):
        make_mixer("scan causal", DIM, HEADS, 8)(torch.zeros(1, 256, DIM))


# --- exponents, timing protocol, Pareto front ------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, 1.37, 2.0])
def test_cost_exponent_recovers_a_known_exponent(p):
    ns = np.array([256, 1024, 4096, 16384])
    rng = np.random.default_rng(int(p * 100))
    times = 3e-7 * ns ** p * np.exp(rng.normal(0, 0.03, size=(11, 4)))
    med, lo, hi = exponent_interval(ns, times)
    assert lo <= p <= hi and abs(med - p) < 0.03
    assert abs(cost_exponent(ns, 5.0 * ns ** p) - p) < 1e-12


@pytest.mark.parametrize("ns,costs,match", [([64], [1.0], "at least 2"), ([64, 64], [1.0, 2.0], "two distinct"),
                                            ([64, 256], [1.0, 0.0], "positive"), ([64, 256], [1.0], "same length")])
def test_cost_exponent_bad_input(ns, costs, match):
    with pytest.raises(ValueError, match=match):
        cost_exponent(ns, costs)


def test_exponent_interval_checks_its_shape():
    with pytest.raises(ValueError, match=r"times must be \(repeats, 3 sizes\)"):
        exponent_interval([1, 2, 3], np.ones((4, 2)))
    with pytest.raises(ValueError, match="at least 2 repeats"):
        exponent_interval([1, 2, 3], np.ones((1, 3)))


def test_exponent_is_robust_to_a_slow_spell():
    # one repeat in five hit by a 10x slowdown at the largest size: the slope through the medians does not move
    ns = np.array([1024, 4096, 16384])
    times = np.tile(1e-6 * ns ** 1.0, (5, 1))
    times[2, -1] *= 10
    med, lo, hi = exponent_interval(ns, times)
    assert abs(med - 1.0) < 1e-12 and lo <= 1.0 <= hi
    assert np.polyfit(np.log(ns), np.log(times.mean(0)), 1)[0] > 1.2          # the mean would have been fooled


def test_time_interleaved_rotates_and_counts():
    calls = []
    out = time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3} and all(t >= 0 for v in out.values() for t in v)
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="fns is empty"):
        time_interleaved({}, repeats=1)
    with pytest.raises(ValueError, match="min_time must be >= 0"):
        time_interleaved({"a": lambda: None}, repeats=1, min_time=-1.0)


def test_time_interleaved_loops_fast_calls_and_reports_per_call():
    import time
    calls = []
    out = time_interleaved({"a": lambda: (calls.append(1), time.sleep(0.001))}, repeats=2, warmup=1, min_time=0.01)
    assert len(calls) > 2 + 1 and all(0.0008 < t < 0.01 for t in out["a"]), out     # looped, then divided by the loops


def test_pareto_front_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = {f"m{i}": (float(t), float(q)) for i, (t, q) in enumerate(rng.integers(1, 6, size=(7, 2)))}
        front = pareto_front(pts)
        for a, (ta, qa) in pts.items():
            beaten = any(tb <= ta and qb >= qa and (tb, qb) != (ta, qa) for b, (tb, qb) in pts.items())
            assert (a in front) == (not beaten)
        assert [pts[a][0] for a in front] == sorted(pts[a][0] for a in front)
