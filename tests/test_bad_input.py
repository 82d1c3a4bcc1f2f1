"""Bad input gives a clear error (issue 24, point 5): one case per probe of the new user's list, each expecting a
ValueError or TypeError whose message names the argument, what it should be and what was passed; then property-based
tests (hypothesis) over the public functions' shapes, dtypes and ranges, each against an independent computation."""
import ast
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from paperlab import attention as A
from paperlab.core import repo_root

PROPS = settings(max_examples=40, deadline=None, derandomize=True)   # derandomized: the same examples on every run


def r(*shape, dtype=torch.float32):
    "A seeded standard-normal tensor of `shape`."
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape)), dtype=dtype)


# --- small models, built once -------------------------------------------------------------------------------------

@functools.cache
def enat_models():
    "A tiny ENAT (encoder-decoder) and a tiny uniform NAT with perturbed adaLN layers (else every block is the identity)."
    from paperlab.enat import ENAT, ENATConfig
    out = {}
    for uniform, enc_dec in ((False, (1, 1)), (True, (2, 0))):
        torch.manual_seed(0)
        m = ENAT(ENATConfig(input_size=2, codebook_size=8, hidden_size=16, num_heads=2, enc_dec=enc_dec, num_classes=3,
                            uniform=uniform)).eval()
        for blk in m.blocks:
            torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
        out[uniform] = m
    return out


@functools.cache
def tiny_dit():
    from paperlab.diffusion import DiT, tiny_dit_config
    torch.manual_seed(0)
    return DiT(tiny_dit_config(depth=1, hidden_size=16, num_heads=2))


@functools.cache
def tiny_dydit():
    from paperlab.diffusion import tiny_dit_config
    from paperlab.dydit import DyDiT, dydit_from
    torch.manual_seed(0)
    return DyDiT(dydit_from(tiny_dit_config(depth=1, hidden_size=16, num_heads=2))).eval()


@functools.cache
def smart_parts():
    "A random tiny CLIP, its seen-class text embeddings, two scenes with their masks, a classifier per variant and a mask generator."
    from paperlab import smart as S
    torch.manual_seed(0)
    clip = S.tiny_clip().eval()
    text = S.text_classifier(clip, S.SEEN)
    sc = S.scenes(2, seed=0)
    images = torch.stack([s["image"] for s in sc])
    masks, _ = S.pad_masks(sc, S.CLASSES)
    clfs = {v: S.MaskClassifier(clip, S.ClassifierConfig(v, "frozen")).eval() for v in S.VARIANTS}
    gen = S.MaskGenerator(S.MaskGeneratorConfig(), clip.visual.transformer.width, text.shape[1], clip.visual.grid_size[0]).eval()
    return dict(S=S, clip=clip, text=text, scenes=sc, images=images, masks=masks, clfs=clfs, gen=gen,
                tokens=S.clip_tokens(clip.visual, images))


def linear_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def float_labels_ds():
    from torch.utils.data import TensorDataset
    return TensorDataset(r(8, 4), torch.full((8,), 2.7))


# --- one case per probe ---------------------------------------------------------------------------------------------

def _scan(u):
    from paperlab.ssm import selective_scan
    return selective_scan(u, r(1, 2, 3), -torch.ones(2, 4), r(2, 4), r(2, 4))


def _deer():
    from paperlab import deer
    return deer


def _enat(uniform=False):
    return enat_models()[uniform]


IDS = torch.tensor([[8, 1, 8, 3]])   # a 2×2 grid: two [MASK] (id 8) and two visible tokens


def _train_nat(labels, n=10):
    from paperlab.enat import train_nat
    m = _enat()
    return train_nat(m.cfg, torch.randint(0, 8, (n, 4), generator=torch.Generator().manual_seed(0)), labels, steps=1,
                     batch_size=4, progress=False)


def _train_flow(y):
    from paperlab.diffusion import train_flow
    return train_flow(tiny_dit(), r(4, 1, 16, 16), y, steps=1, batch_size=2, progress=False)


def _fit(ds):
    from paperlab.train import fit
    return fit(linear_net(), ds, epochs=1, progress=False)


def _smart_clf(variant, images=None, masks=None, text=None):
    p = smart_parts()
    return p["clfs"][variant](p["images"] if images is None else images, p["masks"] if masks is None else masks,
                              p["text"] if text is None else text)


def _smart_gen(images=None, tokens=None, text=None):
    p = smart_parts()
    return p["gen"](p["images"] if images is None else images, p["tokens"] if tokens is None else tokens,
                    p["text"] if text is None else text)


VARIANTS = ("pool", "token", "sma", "sma_bias")
BIG_IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))   # the tiny CLIP takes 32×32

# (case id, call, exception type, regex the message must match: the argument, the expectation and what was passed)
CASES = [
    # silent wrong results
    ("selective_scan int64 u", lambda: _scan(torch.ones(1, 2, 3, dtype=torch.long)), TypeError, r"\bu\b.*floating.*int64"),
    *[(f"{n} attention, zero keys", lambda n=n: A.get_attention(n)[0](r(1, 1, 3, 4), r(1, 1, 0, 4), r(1, 1, 0, 4)),
       ValueError, r"at least one key.*k \(1, 1, 0, 4\)") for n in ("softmax", "linear", "inline")],
    ("mediator attention, zero keys", lambda: A.mediator_attention(r(1, 1, 3, 4), r(1, 1, 0, 4), r(1, 1, 0, 4), r(1, 1, 2, 4)),
     ValueError, r"at least one key.*k \(1, 1, 0, 4\)"),
    ("drop_visual_tokens duplicate index", lambda: __import__("paperlab.vlm").vlm.drop_visual_tokens(None, torch.tensor([[1, 1]]), 0),
     ValueError, r"keep_vis.*twice"),
    ("drop_visual_tokens float index", lambda: __import__("paperlab.vlm").vlm.drop_visual_tokens(None, torch.tensor([[1.0, 2.0]]), 0),
     TypeError, r"keep_vis.*integer.*float32"),
    ("beta_order_stat(0, 3)", lambda: __import__("paperlab.enat").enat.beta_order_stat(0, 3), ValueError, r"\ba\b.*>= 1.*got 0"),
    ("beta_order_stat(2, 0)", lambda: __import__("paperlab.enat").enat.beta_order_stat(2, 0), ValueError, r"\bb\b.*>= 1.*got 0"),
    ("beta_order_stat(1.5, 3)", lambda: __import__("paperlab.enat").enat.beta_order_stat(1.5, 3), TypeError, r"\ba\b.*whole number.*1\.5"),
    ("DeeR solve_thresholds, NaN statistics",
     lambda: _deer().solve_thresholds(np.array([[np.nan, 1, 2, 3], [1, 2, 3, 4]]), 1.0), ValueError, r"values.*finite.*1 of 8"),
    ("DeeR thresholds_for_budget, NaN statistics",
     lambda: _deer().thresholds_for_budget(np.full((3, 10), np.nan), 2.0, [1, 2, 3]), ValueError, r"values.*finite.*30 of 30"),
    ("DeeR thresholds_for_budget, NaN cost",
     lambda: _deer().thresholds_for_budget(np.ones((3, 10)), 2.0, [1, float("nan"), 3]), ValueError, r"costs.*finite.*1 of 3"),
    ("DeeR thresholds_for_budget, NaN budget",
     lambda: _deer().thresholds_for_budget(np.ones((3, 10)), float("nan"), [1, 2, 3]), ValueError, r"budget.*finite.*nan"),
    ("DeeR expected_cost, NaN cost", lambda: _deer().expected_cost(1.0, [1, float("nan"), 3]), ValueError, r"costs.*finite"),
    ("DeeR simulate_exits, NaN statistics",
     lambda: _deer().simulate_exits(np.array([[np.nan, 1.0], [1.0, 2.0]]), [0.5, np.inf]), ValueError, r"values.*finite"),
    ("softmax_twice_threshold(0)", lambda: __import__("paperlab.unitta").unitta.softmax_twice_threshold(0), ValueError,
     r"num_classes.*>= 2.*got 0"),
    ("softmax_twice_threshold(-3)", lambda: __import__("paperlab.unitta").unitta.softmax_twice_threshold(-3), ValueError,
     r"num_classes.*>= 2.*got -3"),
    ("attention_macs(n=-5)", lambda: A.attention_macs("softmax", -5, 4), ValueError, r"\bn\b.*-5"),
    ("ENAT attn_mask on an encoder-decoder model",
     lambda: _enat()(IDS, torch.tensor([1]), attn_mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool)), ValueError,
     r"attn_mask.*uniform.*enc_dec=\(1, 1\)"),
    ("ENAT float labels", lambda: _enat()(IDS, torch.tensor([2.7])), TypeError, r"labels.*integer.*float32"),
    ("ENAT float labels (python list)", lambda: _enat()(IDS, [2.7]), TypeError, r"labels.*integer.*float"),
    ("ENAT generate, float labels", lambda: __import__("paperlab.enat").enat.generate(_enat(), torch.tensor([2.7]), steps=2),
     TypeError, r"labels.*integer.*float32"),
    ("train_nat float labels", lambda: _train_nat(torch.full((10,), 1.5)), TypeError, r"labels.*integer.*float32"),
    ("DiT float labels", lambda: tiny_dit()(r(2, 1, 16, 16), torch.zeros(2), torch.tensor([2.7, 1.0])), TypeError,
     r"\by\b.*integer.*float32"),
    ("DyDiT float labels", lambda: tiny_dydit()(r(2, 1, 16, 16), torch.zeros(2), torch.tensor([2.7, 1.0])), TypeError,
     r"\by\b.*integer.*float32"),
    ("euler_sample label out of range",
     lambda: __import__("paperlab.diffusion").diffusion.euler_sample(tiny_dit(), torch.tensor([3, 11]), steps=1), ValueError,
     r"\by\b.*outside \[0, 10\].*11"),
    ("train_flow float labels", lambda: _train_flow(torch.tensor([2.7, 1.0, 2.0, 3.0])), TypeError, r"\by\b.*integer.*float32"),
    ("fit float labels", lambda: _fit(float_labels_ds()), TypeError, r"labels.*integer.*float32"),
    ("fit_seeds float labels", lambda: __import__("paperlab.train").train.fit_seeds(linear_net, [0], (r(8, 4), torch.full((8,), 2.7)), epochs=1),
     TypeError, r"labels.*integer.*float32"),
    ("evaluate float labels", lambda: __import__("paperlab.train").train.evaluate(linear_net(), float_labels_ds()), TypeError,
     r"labels.*integer.*float32"),
    # obscure crashes
    ("attention int dtype", lambda: A.softmax_attention(*[torch.ones(1, 1, 2, 4, dtype=torch.long)] * 3), TypeError, r"floating.*\bq\b.*int64"),
    ("attention mixed dtypes", lambda: A.linear_attention(r(1, 1, 2, 4), r(1, 1, 2, 4, dtype=torch.float64), r(1, 1, 2, 4)),
     TypeError, r"one dtype.*float32, torch.float64"),
    ("attention numpy arrays", lambda: A.inline_attention(*[np.ones((1, 1, 2, 4))] * 3), TypeError, r"tensors.*\bq\b.*ndarray"),
    ("mediator bias of the wrong shape",
     lambda: A.mediator_attention(r(1, 1, 3, 4), r(1, 1, 3, 4), r(1, 1, 3, 4), r(1, 1, 2, 4), bias_mk=r(1, 1, 5, 5)),
     ValueError, r"bias_mk.*\(1, 1, 2, 3\).*\(1, 1, 5, 5\)"),
    ("InLine tiny_vit num_heads=5", lambda: __import__("paperlab.inline").inline.tiny_vit("inline", True, num_heads=5),
     ValueError, r"num_heads 5.*48|48.*num_heads 5"),
    ("InLine DeiT config num_heads=5", lambda: __import__("paperlab.inline").inline.InLineDeiTConfig(num_heads=5),
     ValueError, r"num_heads 5"),
    ("InLine Swin config num_heads=5", lambda: __import__("paperlab.inline").inline.InLineSwinConfig(num_heads=(3, 5, 12, 24)),
     ValueError, r"num_heads 5"),
    ("VLM vision_heads=5", lambda: __import__("paperlab.vlm").vlm.VLMConfig(vision_heads=5), ValueError, r"vision.*num_heads 5|num_heads 5"),
    ("VLM num_heads=5", lambda: __import__("paperlab.vlm").vlm.VLMConfig(num_heads=5), ValueError, r"num_heads 5"),
    ("DeeR policy num_heads=5", lambda: _deer().PolicyConfig(num_heads=5), ValueError, r"num_heads 5"),
    ("DeeR Flamingo n_heads=5", lambda: _deer().FlamingoLLMConfig(d_model=64, n_heads=5), ValueError, r"num_heads 5"),
    ("SMART CLIP heads=5", lambda: smart_parts()["S"].TinyClipConfig(heads=5), ValueError, r"num_heads 5"),
    ("SMART mask generator heads=5", lambda: smart_parts()["S"].MaskGeneratorConfig(heads=5), ValueError, r"num_heads 5"),
    ("DiT num_heads=5", lambda: __import__("paperlab.diffusion").diffusion.DiT(__import__("paperlab.diffusion").diffusion.tiny_dit_config(num_heads=5)),
     ValueError, r"num_heads 5"),
    ("ENAT num_heads=5", lambda: __import__("paperlab.enat").enat.ENATConfig(hidden_size=64, num_heads=5), ValueError, r"num_heads 5"),
    ("InLine model_cost unknown name", lambda: __import__("paperlab.inline").inline.model_cost("nope"), ValueError,
     r"'nope'.*inline_deit_tiny"),
    ("mediators model_cost unknown name", lambda: __import__("paperlab.mediators").mediators.model_cost("nope"), ValueError,
     r"'nope'.*SiT-XL/2"),
    ("DyDiT model_cost unknown name", lambda: __import__("paperlab.dydit").dydit.model_cost("nope"), ValueError,
     r"'nope'.*DiT-XL/2"),
    ("DeeR expected_cost(q=0)", lambda: _deer().expected_cost(0, [1, 2, 3]), ValueError, r"\bq\b.*positive.*got 0"),
    ("DeeR expected_cost(q=-1)", lambda: _deer().expected_cost(-1.0, [1, 2, 3]), ValueError, r"\bq\b.*positive.*got -1"),
    ("InLine attention, zero keys", lambda: A.inline_attention(r(1, 1, 3, 4), r(1, 1, 0, 4), r(1, 1, 0, 4)), ValueError,
     r"at least one key"),
    ("InLineAttention module, zero tokens",
     lambda: __import__("paperlab.inline").inline.InLineAttention(64, 4, local=False)(r(1, 0, 64)), ValueError, r"at least one key"),
    *[(f"SMART {v} classifier, wrong image size", lambda v=v: _smart_clf(v, images=BIG_IMAGES), ValueError,
       r"images.*\(B, 3, 32, 32\).*\(2, 3, 64, 64\)") for v in VARIANTS],
    *[(f"SMART {v} classifier, mismatched batch", lambda v=v: _smart_clf(v, images=smart_parts()["images"][:1]), ValueError,
       r"masks.*batch.*1.*2|batch.*images 1.*masks 2") for v in VARIANTS],
    *[(f"SMART {v} classifier, text of the wrong width", lambda v=v: _smart_clf(v, text=r(5, 32)), ValueError,
       r"text.*\(C, 64\).*\(5, 32\)") for v in VARIANTS],
    ("SMART clip_tokens, wrong image size", lambda: smart_parts()["S"].clip_tokens(smart_parts()["clip"].visual, BIG_IMAGES),
     ValueError, r"images.*\(B, 3, 32, 32\).*\(2, 3, 64, 64\)"),
    ("SMART mask generator, mismatched batch", lambda: _smart_gen(images=smart_parts()["images"][:1]), ValueError,
     r"tokens.*batch|batch.*images 1.*tokens 2"),
    ("SMART mask generator, tokens of a wrong image size",
     lambda: _smart_gen(tokens=r(2, 17, 64)), ValueError, r"tokens.*\(2, 65, 64\).*\(2, 17, 64\)"),
    ("SMART mask generator, text of the wrong width", lambda: _smart_gen(text=r(5, 32)), ValueError, r"text.*\(C, 64\).*\(5, 32\)"),
    ("SMART predict, zero scenes", lambda: smart_parts()["S"].predict(smart_parts()["gen"], None, smart_parts()["clip"], []),
     ValueError, r"test.*no scenes|at least one scene"),
    ("SMART evaluate, zero scenes", lambda: smart_parts()["S"].evaluate({"panoptic": [], "semantic": torch.zeros(0, 32, 32)}, []),
     ValueError, r"test.*no scenes|at least one scene"),
    ("SMART train_classifier, zero scenes",
     lambda: smart_parts()["S"].train_classifier(smart_parts()["S"].MaskClassifier(smart_parts()["clip"]), smart_parts()["clip"], [], steps=1),
     ValueError, r"train.*no scenes|at least one scene"),
    ("SMART train_mask_generator, zero scenes",
     lambda: smart_parts()["S"].train_mask_generator(smart_parts()["clip"], [], steps=1, progress=False), ValueError,
     r"train.*no scenes|at least one scene"),
    ("SMART pad_masks, zero scenes", lambda: smart_parts()["S"].pad_masks([], smart_parts()["S"].CLASSES), ValueError,
     r"batch.*no scenes|at least one scene"),
    ("train_nat with too few labels", lambda: _train_nat(torch.zeros(3, dtype=torch.long)), ValueError,
     r"labels.*\(10,\).*\(3,\)"),
    ("train_flow with too few labels", lambda: _train_flow(torch.tensor([1, 2])), ValueError, r"\by\b.*\(4,\).*\(2,\)"),
]


@pytest.mark.parametrize("call, exc, msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_uniform_nat_still_honours_attn_mask():
    "Refusing the mask on ENAT must not take it from the uniform NAT: blocking everything but the diagonal changes its output."
    m = _enat(uniform=True)
    open_ = m(IDS, torch.tensor([1]))["logits"]
    eye = torch.eye(4, dtype=torch.bool)[None, None]
    assert not torch.allclose(open_, m(IDS, torch.tensor([1]), attn_mask=eye)["logits"])
    assert torch.equal(open_, m(IDS, torch.tensor([1]), attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))["logits"])
    with pytest.raises(TypeError, match=r"attn_mask.*bool.*float32"):
        m(IDS, torch.tensor([1]), attn_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"attn_mask.*\(1, 1, 4, 4\).*\(1, 1, 3, 3\)"):
        m(IDS, torch.tensor([1]), attn_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_integer_labels_still_work():
    "The label checks refuse floats, not the integer labels the book trains on (int32 and numpy ints included)."
    m = _enat()
    ref = m(IDS, torch.tensor([2]))["logits"]
    for y in (torch.tensor([2], dtype=torch.int32), np.array([2]), [2], 2):
        assert torch.equal(m(IDS, y)["logits"], ref)
    dit = tiny_dit()
    x = r(2, 1, 16, 16)
    assert torch.equal(dit(x, torch.zeros(2), torch.tensor([2, 1])), dit(x, torch.zeros(2), torch.tensor([2, 1], dtype=torch.int32)))


def test_soft_targets_and_custom_losses_may_be_float():
    "fit refuses float class ids under its default cross-entropy, but (N, C) probabilities and a custom loss_fn take floats."
    from torch.utils.data import TensorDataset
    from paperlab.train import fit
    soft = torch.full((8, 3), 1 / 3)
    fit(linear_net(), TensorDataset(r(8, 4), soft), epochs=1, progress=False)
    mse = lambda out, y: ((out[:, 0] - y) ** 2).mean()
    fit(linear_net(), TensorDataset(r(8, 4), torch.full((8,), 2.7)), epochs=1, progress=False, loss_fn=mse)


def test_torch_load_always_gets_weights_only_true():
    "Every torch.load in the package passes weights_only=True explicitly (no pickle code runs from a data file)."
    calls = []
    for path in sorted((repo_root() / "paperlab").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True
                calls.append((path.name, node.lineno, ok))
    assert [c for c in calls if c[0] != "_modidx.py" and not c[2]] == []
    assert len(calls) >= 4   # enat (2), train, vlm: the test sees the calls it is about


# --- the shared helpers -------------------------------------------------------------------------------------------

@PROPS
@given(st.integers(-3, 64), st.integers(-3, 16))
def test_check_heads_property(dim, heads):
    "check_heads returns dim // heads exactly when both are positive and heads divides dim, else names both numbers."
    if dim >= 1 and heads >= 1 and dim % heads == 0:
        assert A.check_heads(dim, heads) == dim // heads
    else:
        with pytest.raises(ValueError, match=rf"{dim}.*{heads}|{heads}.*{dim}"):
            A.check_heads(dim, heads)


@PROPS
@given(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(), st.just("3")), st.integers(-2, 2))
def test_check_int_property(x, low):
    "check_int passes whole numbers >= low through unchanged and names the argument otherwise."
    whole = isinstance(x, int) and not isinstance(x, bool)
    if whole and x >= low:
        assert A.check_int(x, "n", low) == x
    else:
        with pytest.raises(TypeError if not whole else ValueError, match=r"\bn\b"):
            A.check_int(x, "n", low)


label_dtypes = st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.float64, torch.bool])


@PROPS
@given(label_dtypes, st.lists(st.integers(0, 12), min_size=1, max_size=6), st.integers(1, 12))
def test_check_class_labels_property(dtype, values, num_classes):
    "Integer labels in [0, num_classes) come back as int64 with the same values; other dtypes are a TypeError, values out of range a ValueError."
    y = torch.tensor(values).to(dtype)
    if dtype.is_floating_point or dtype == torch.bool:
        with pytest.raises(TypeError, match=str(dtype)):
            A.check_class_labels(y, num_classes)
    elif max(values) >= num_classes:
        with pytest.raises(ValueError, match=rf"\[0, {num_classes - 1}\].*{max(values)}"):
            A.check_class_labels(y, num_classes)
    else:
        out = A.check_class_labels(y, num_classes)
        assert out.dtype == torch.int64 and out.tolist() == values


@PROPS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8))
def test_check_finite_property(values):
    "check_finite passes finite data and counts the NaN/inf entries it refuses."
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        with pytest.raises(ValueError, match=rf"x.*{bad} of {len(values)}"):
            A.check_finite(np.array(values), "x")
    else:
        A.check_finite(np.array(values), "x")


# --- the public functions' shapes, dtypes and ranges ----------------------------------------------------------------

dims = st.integers(1, 3)
tokens = st.integers(0, 5)
float_dtypes = st.sampled_from([torch.float32, torch.float64])
bad_dtypes = st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8])


@PROPS
@given(dims, dims, st.integers(1, 5), tokens, st.integers(1, 4), st.integers(1, 4), float_dtypes,
       st.sampled_from(["softmax", "linear", "inline"]))
def test_attention_shapes_and_zero_keys(b, h, n, m, d, e, dtype, name):
    "For any (B, H, N, d), (B, H, M, d), (B, H, M, e): the fast form is (B, H, N, e) and equals the weights reference times v; M = 0 is refused."
    fast, weights = A.get_attention(name)
    q, k, v = r(b, h, n, d, dtype=dtype), r(b, h, m, d, dtype=dtype), r(b, h, m, e, dtype=dtype)
    if m == 0:
        with pytest.raises(ValueError, match=r"at least one key"):
            fast(q, k, v)
        return
    out = fast(q, k, v)
    assert out.shape == (b, h, n, e) and out.dtype == dtype
    torch.testing.assert_close(out, weights(q, k) @ v, atol=1e-4, rtol=1e-4)


@PROPS
@given(bad_dtypes, st.integers(0, 2), st.sampled_from(["softmax", "linear", "inline"]))
def test_attention_refuses_non_float(dtype, which, name):
    "An integer or boolean q, k or v is a TypeError naming the tensor and its dtype, never a silent integer product."
    qkv = [r(1, 2, 3, 4) for _ in range(3)]
    qkv[which] = qkv[which].to(dtype)
    with pytest.raises(TypeError, match=rf"\b{'qkv'[which]}\b.*{dtype}|{dtype}"):
        A.get_attention(name)[0](*qkv)


@PROPS
@given(dims, dims, st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))
def test_mediator_attention_shapes(b, h, n, m, d, e):
    "Mediator attention is (B, H, N, e) and equals its implied N×N matrix times v for any shapes."
    q, k, v, med = r(b, h, n, d, dtype=torch.float64), r(b, h, n, d, dtype=torch.float64), r(b, h, n, e, dtype=torch.float64), r(b, h, m, d, dtype=torch.float64)
    out = A.mediator_attention(q, k, v, med)
    assert out.shape == (b, h, n, e)
    torch.testing.assert_close(out, A.mediator_attention_weights(q, k, med) @ v)


@PROPS
@given(st.sampled_from(list(A.ATTENTION)), st.integers(-3, 300), st.integers(-3, 64))
def test_attention_macs_property(name, n, d):
    "attention_macs is the closed form 2·n²·d (softmax) or 2·n·d² (linear forms) for positive n, d; otherwise a ValueError naming n or d."
    if n >= 1 and d >= 1:
        assert A.attention_macs(name, n, d) == (2 * n * n * d if name == "softmax" else 2 * n * d * d)
    else:
        with pytest.raises(ValueError, match=r"\bn\b" if n < 1 else r"\bd\b"):
            A.attention_macs(name, n, d)


@PROPS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(0, 6), st.integers(1, 3),
       st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32, torch.float16]))
def test_selective_scan_dtypes_and_shapes(b, d, L, n, dtype):
    "The scan keeps u's float dtype and (B, D, L) shape and agrees with the float64 loop; integer u is a TypeError."
    from paperlab.ssm import selective_scan, selective_scan_sequential
    u = r(b, d, L).to(dtype)
    args = (r(b, d, L).abs() * 0.1, -torch.ones(d, n), r(d, n), r(d, n))
    if not dtype.is_floating_point:
        with pytest.raises(TypeError, match=rf"\bu\b.*{dtype}"):
            selective_scan(u, *args)
        return
    out = selective_scan(u, *args)
    assert out.shape == (b, d, L) and out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double(), selective_scan_sequential(u, *args), atol=tol, rtol=tol)


@PROPS
@given(st.integers(-2, 6), st.integers(-2, 6), st.integers(0, 4))
def test_beta_order_stat_property(a, b, n):
    "Beta(a, b) order statistics: for a, b >= 1, n draws in [0, 1] equal to the a-th smallest of a+b−1 uniforms; else a ValueError naming a or b."
    from paperlab.enat import beta_order_stat
    if a >= 1 and b >= 1:
        out = beta_order_stat(a, b, n, torch.Generator().manual_seed(0))
        ref = torch.rand(n, a + b - 1, generator=torch.Generator().manual_seed(0)).sort(-1).values[:, a - 1]
        assert out.shape == (n,) and torch.equal(out, ref) and ((out >= 0) & (out <= 1)).all()
    else:
        with pytest.raises(ValueError, match=r"\ba\b" if a < 1 else r"\bb\b"):
            beta_order_stat(a, b, n)


@PROPS
@given(st.one_of(st.floats(min_value=-2, max_value=50), st.just(0.0), st.just(math.nan)),
       st.lists(st.floats(0.5, 40), min_size=1, max_size=6), st.booleans())
def test_expected_cost_property(q, costs, skip_first):
    "Σ p_k(q) C_k is a weighted mean: it lies between the allowed costs' min and max for q > 0; q <= 0 or NaN is a ValueError naming q."
    from paperlab.deer import expected_cost
    if not (q > 0):
        with pytest.raises(ValueError, match=r"\bq\b"):
            expected_cost(q, costs, skip_first)
        return
    allowed = costs[1:] if skip_first and len(costs) > 1 else costs
    c = expected_cost(q, costs, skip_first)
    assert min(allowed) - 1e-9 <= c <= max(allowed) + 1e-9
    # an independent computation in plain Python with the profile normalised directly (moderate q only: no overflow)
    if 0.05 <= q <= 20:
        w = [0.0 if (skip_first and k == 1 and len(costs) > 1) else q ** k for k in range(1, len(costs) + 1)]
        if sum(w) > 0:
            assert math.isclose(c, sum(wi * ci for wi, ci in zip(w, costs)) / sum(w), rel_tol=1e-9)


@PROPS
@given(st.integers(2, 4), st.integers(1, 30), st.floats(0.2, 5.0), st.integers(0, 3))
def test_solve_thresholds_refuses_any_nan(E, n, q, where):
    "One NaN anywhere in the statistics is refused; without it the thresholds are sorted-order statistics of the data."
    from paperlab.deer import simulate_exits, solve_thresholds
    v = np.random.default_rng(E * 100 + n).random((E, n)).astype(np.float32)
    th = solve_thresholds(v, q)
    assert th.shape == (E,) and np.isinf(th[-1]) and th[-1] > 0
    assert simulate_exits(v, th).shape == (n,)
    v[where % E, n // 2] = np.nan
    with pytest.raises(ValueError, match=r"values.*finite"):
        solve_thresholds(v, q)


@PROPS
@given(st.integers(1, 3), st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_drop_visual_tokens_property(b, row):
    "A keep_vis row with a repeated index is refused; distinct indices pass the check (the model is only needed past it)."
    from paperlab.vlm import drop_visual_tokens
    keep = torch.tensor([row] * b)
    if len(set(row)) < len(row):
        with pytest.raises(ValueError, match=r"keep_vis.*twice"):
            drop_visual_tokens(None, keep, 0)
    with pytest.raises(TypeError, match=r"keep_vis"):
        drop_visual_tokens(None, keep.float(), 0)


@PROPS
@given(st.integers(0, 3), st.integers(1, 3), st.sampled_from([torch.float32, torch.int64, torch.int32]))
def test_enat_labels_property(label, batch, dtype):
    "ENAT's labels: integer ids in [0, num_classes] (num_classes = the null class) pass, one per sample or one for all; floats are a TypeError."
    m = _enat()
    ids = IDS.expand(batch, -1)
    y = torch.full((batch,), label).to(dtype)
    if dtype.is_floating_point:
        with pytest.raises(TypeError, match=r"labels.*integer"):
            m(ids, y)
    else:
        assert m.check_labels(y, batch).tolist() == [label] * batch
        assert m.check_labels(y[:1], batch).tolist() == [label] * batch
