"""Selective scan: the chunked scan against our float64 loop and mamba-ssm's selective_scan_ref (its test grid, sampled), every B/C layout, the state's dtype, golden outputs, linear memory, bad shapes, CUDA kernel."""
import itertools
import random

import numpy as np
import pytest
import torch

from paperlab.core import peak_memory, repo_root
from paperlab.ssm import (check_scan_args, has_cuda_kernel, kernel_groups_error, linear_scan, mamba_ssm_interface,
                          selective_scan, selective_scan_chunked, selective_scan_ref, selective_scan_sequential)


def inputs(b=2, d=3, L=70, n=4, dtype=torch.float64, seed=0, extras=True, B_layout="var", C_layout="var"):
    "Random scan arguments; a B/C layout is 'var' (B, N, L), 'inv' (D, N) or a group count G (B, G, N, L)."
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    bc = lambda layout: r(b, n, L) if layout == "var" else r(d, n) if layout == "inv" else r(b, layout, n, L)
    kw = dict(u=r(b, d, L), delta=r(b, d, L), A=-torch.rand(d, n, generator=g, dtype=dtype) * 3, B=bc(B_layout), C=bc(C_layout))
    if extras: kw.update(D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.1, delta_softplus=True)
    else: kw["delta"] = kw["delta"].abs()
    return kw


def entry(X, i, d, t, dim):
    "The (N,) coefficients of B or C at batch i, channel d, step t, as mamba-ssm's selective_scan_ref reads each layout."
    if X.dim() == 2: return X[d]                                          # (D, N): time-invariant
    if X.dim() == 3: return X[i, :, t]                                    # (B, N, L)
    return X[i, d // (dim // X.shape[1]), :, t]                           # (B, G, N, L): einops "B G N L -> B (G H) N L"


def naive_loop(kw):
    "The recurrence written out element by element (independent of paperlab's helpers)."
    u, dl, A, B, C = (kw[k].double() for k in "u delta A B C".split())
    if "delta_bias" in kw: dl = dl + kw["delta_bias"].double()[:, None]
    if kw.get("delta_softplus"): dl = torch.log1p(torch.exp(dl))
    b_, d_, L = u.shape
    y = torch.zeros(b_, d_, L, dtype=torch.float64)
    for i in range(b_):
        for d in range(d_):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(L):
                h = torch.exp(dl[i, d, t] * A[d]) * h + dl[i, d, t] * entry(B, i, d, t, d_) * u[i, d, t]
                y[i, d, t] = (entry(C, i, d, t, d_) * h).sum()
    if "D" in kw: y = y + u * kw["D"].double()[:, None]
    if "z" in kw: y = y * torch.nn.functional.silu(kw["z"].double())
    return y


@pytest.mark.parametrize("L,extras", [(1, True), (37, False), (90, True)])
def test_sequential_equals_naive_loop(L, extras):
    kw = inputs(L=L, extras=extras, b=1, d=2)
    torch.testing.assert_close(selective_scan_sequential(**kw), naive_loop(kw), atol=1e-12, rtol=1e-12)


LAYOUTS = [("inv", "inv"), ("inv", "var"), ("var", "inv"), (1, "var"), (2, 2), (3, 6), ("inv", 2), (6, "inv")]


@pytest.mark.parametrize("B_layout,C_layout", LAYOUTS)
def test_sequential_equals_naive_loop_bc_layouts(B_layout, C_layout):
    kw = inputs(L=23, b=2, d=6, n=3, B_layout=B_layout, C_layout=C_layout)     # D = 6: 1, 2, 3 or 6 groups
    torch.testing.assert_close(selective_scan_sequential(**kw), naive_loop(kw), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("B_layout,C_layout", LAYOUTS)
def test_chunked_equals_sequential_bc_layouts(B_layout, C_layout):
    kw = inputs(L=150, d=6, B_layout=B_layout, C_layout=C_layout)
    ref, ref_last = selective_scan_sequential(**kw, return_last_state=True)
    out, last = selective_scan_chunked(**kw, return_last_state=True, chunk=8)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(last, ref_last, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("L,chunk", [(1, 64), (63, 64), (64, 64), (65, 64), (700, 64), (700, 4), (129, 2)])
def test_chunked_equals_sequential_float64(L, chunk):
    kw = inputs(L=L)
    ref, ref_last = selective_scan_sequential(**kw, return_last_state=True)
    out, last = selective_scan_chunked(**kw, return_last_state=True, chunk=chunk)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(last, ref_last, atol=1e-10, rtol=1e-10)


def test_chunked_fails_when_wrong():
    kw = inputs(L=100)
    bad = dict(kw, A=kw["A"] * 1.01)                                     # sensitivity: a 1 % change in A is seen
    assert (selective_scan_chunked(**bad) - selective_scan_sequential(**kw)).abs().max() > 1e-4


def test_linear_scan_long_decay_no_overflow():
    a = torch.full((1, 5000), 1e-3, dtype=torch.float32)                  # cumulative decay underflows to 0
    b = torch.ones(1, 5000)
    h = linear_scan(a, b)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[0, -1], torch.tensor(1.0 / (1 - 1e-3)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extras", [False, True])
def test_against_mamba_ssm_reference(extras):
    kw = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inputs(L=90, extras=extras).items()}
    torch.testing.assert_close(selective_scan(**kw), selective_scan_ref(**kw), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("B_layout,C_layout", LAYOUTS)
def test_bc_layouts_against_mamba_ssm_reference(B_layout, C_layout):
    kw = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inputs(L=90, d=6, B_layout=B_layout, C_layout=C_layout).items()}
    out, last = selective_scan(**kw, return_last_state=True)
    ref, ref_last = mamba_ssm_interface().selective_scan_ref(**kw, return_last_state=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(last, ref_last, atol=2e-5, rtol=1e-4)


# ---- mamba-ssm's test grid: tests/ops/test_selective_scan.py::test_selective_scan (state-spaces/mamba e9594ce) ----
# The values of its parametrize lines, the commented-out ones included (its CI runs only seqlen 128..4096 x
# varBC_groups 1, 2 with every flag on). wtype complex64 is left out: paperlab refuses complex A (test_complex_A_refused).
MAMBA_GRID = dict(
    itype=(torch.float32, torch.float16, torch.bfloat16),
    seqlen=(8, 16, 32, 64, 128, 256, 372, 512, 784, 1024, 1134, 2048, 4096),
    return_last_state=(False, True), has_delta_bias=(False, True), delta_softplus=(False, True), has_z=(False, True),
    has_D=(False, True), varBC_groups=(1, 2), is_variable_C=(False, True), is_variable_B=(False, True))


def applicable(case):
    "mamba-ssm skips groups > 1 unless both B and C vary."
    return case["varBC_groups"] == 1 or (case["is_variable_B"] and case["is_variable_C"])


def grid_sample(n_cases=48, seed=0, long=1024):
    "A fixed sample of MAMBA_GRID: one case per seqlen, then cases with seqlen <= long (mamba-ssm's reference loop is slow)."
    rng = random.Random(seed)
    def draw(seqlen):
        while True:
            case = {k: rng.choice(v) for k, v in MAMBA_GRID.items()} | {"seqlen": seqlen}
            if applicable(case): return case
    cases = [draw(L) for L in MAMBA_GRID["seqlen"]]
    short = [L for L in MAMBA_GRID["seqlen"] if L <= long]
    return cases + [draw(rng.choice(short)) for _ in range(n_cases - len(cases))]


GRID_CASES = grid_sample()


def case_id(case):
    flags = "".join(k[0] if case[k] else "-" for k in ("return_last_state", "has_delta_bias", "delta_softplus", "has_z", "has_D"))
    bc = "".join("v" if case[k] else "i" for k in ("is_variable_B", "is_variable_C"))
    return f"L{case['seqlen']}-{str(case['itype'])[6:]}-G{case['varBC_groups']}-BC{bc}-{flags}"


def test_grid_sample_covers_every_value():
    assert 40 <= len(GRID_CASES) <= 60 and all(applicable(c) for c in GRID_CASES)
    for k, values in MAMBA_GRID.items():
        assert {c[k] for c in GRID_CASES} == set(values), k
    n_full = sum(applicable(dict(zip(MAMBA_GRID, v))) for v in itertools.product(*MAMBA_GRID.values()))
    assert n_full == 3 * 13 * 2**5 * (4 + 1)                              # groups 1 with any B, C; groups 2 with both varying


@pytest.mark.parametrize("case", GRID_CASES, ids=case_id)
def test_selective_scan_mamba_grid(case):
    itype, L, G = case["itype"], case["seqlen"], case["varBC_groups"]
    # mamba-ssm's tolerances
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)
    if itype == torch.bfloat16: rtol, atol = 3e-2, 5e-2
    rtolw, atolw = 1e-3, 1e-3
    if case["has_z"]: rtolw, atolw = max(rtolw, rtol), max(atolw, atol)
    # mamba-ssm's inputs: batch 2, dim 4, dstate 8; A, D, delta_bias and a time-invariant B or C in float32 (wtype)
    b, d, n = 2, 4, 8
    g = torch.Generator().manual_seed(0)
    def bc(variable):
        if not variable: return torch.randn(d, n, generator=g)
        return torch.randn(*((b, n, L) if G == 1 else (b, G, n, L)), generator=g).to(itype)
    x = dict(A=-0.5 * torch.rand(d, n, generator=g), B=bc(case["is_variable_B"]), C=bc(case["is_variable_C"]))
    if case["has_D"]: x["D"] = torch.randn(d, generator=g)
    if case["has_z"]: x["z"] = torch.randn(b, d, L, generator=g).to(itype)
    if case["has_delta_bias"]: x["delta_bias"] = 0.5 * torch.rand(d, generator=g)
    x["u"] = torch.randn(b, d, L, generator=g).to(itype)
    x["delta"] = (0.5 * torch.rand(b, d, L, generator=g)).to(itype)
    dout = torch.randn(b, d, L, generator=g).to(itype)
    flags = dict(delta_softplus=case["delta_softplus"], return_last_state=case["return_last_state"])
    res = {}
    for name, fn in (("ours", selective_scan), ("ref", mamba_ssm_interface().selective_scan_ref)):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        # the reference's gate SiLU(z) runs in z's dtype, the kernel's (and ours) in float32: give the reference a
        # float32 z, so that it computes the kernel's arithmetic (test_gate_precision_follows_the_kernel)
        out = fn(**(leaves | {"z": leaves["z"].float()} if name == "ref" and "z" in x else leaves), **flags)
        out, state = out if case["return_last_state"] else (out, None)
        out.backward(dout)
        res[name] = out.detach(), state, {k: v.grad.to(x[k].dtype) for k, v in leaves.items()}
    (out, state, grad), (out_ref, state_ref, grad_ref) = res["ours"], res["ref"]
    close = lambda a, e, rt, at: torch.testing.assert_close(a, e, rtol=rt, atol=at)   # allclose's test, dtypes checked too
    close(out, out_ref, rtol, atol)
    if case["return_last_state"]: close(state.detach(), state_ref.detach(), rtol, atol)
    close(grad["u"], grad_ref["u"], rtol * 2, atol * 2)
    close(grad["delta"], grad_ref["delta"], rtol * 5, atol * 10)
    close(grad["A"], grad_ref["A"], rtolw, atolw * 5)
    for k in ("B", "C"):
        variable = case[f"is_variable_{k}"]
        close(grad[k], grad_ref[k], rtol if variable else rtolw, atol if variable else atolw)
    for k in ("D", "z", "delta_bias"):
        if k in x: close(grad[k], grad_ref[k], rtolw, atolw)


@pytest.mark.parametrize("itype,wtype", [(torch.float64, torch.float32), (torch.float32, torch.float32),
                                         (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float32, torch.bfloat16)], ids=lambda t: str(t)[6:])
def test_last_state_dtype_follows_mamba_ssm(itype, wtype):
    # selective_scan_ref: out in u's dtype; the state starts as A.new_zeros and gathers float32 terms
    kw = inputs(L=40, dtype=torch.float32)
    kw = dict(kw, A=kw["A"].to(wtype), **{k: kw[k].to(itype) for k in ("u", "delta", "B", "C", "z")})
    out, last = selective_scan(**kw, return_last_state=True)
    ref, ref_last = mamba_ssm_interface().selective_scan_ref(**kw, return_last_state=True)
    assert (out.dtype, last.dtype) == (ref.dtype, ref_last.dtype) == (itype, torch.float32)
    torch.testing.assert_close(last, ref_last, atol=1e-4, rtol=1e-4)


def test_gate_precision_follows_the_kernel():
    # selective_scan_ref computes F.silu(z) in z's dtype; the CUDA kernel (selective_scan_fwd_kernel.cuh: float z_val,
    # expf) and the chunked scan in float32. At float16 ours equals the reference given a float32 z (both round the same
    # float32 result to float16; measured 0.0), not the reference given the float16 z (measured 1.6e-2).
    kw = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inputs(L=128, d=4, n=8, extras=True).items()}
    kw = dict(kw, u=kw["u"].half(), delta=kw["delta"].half(), z=kw["z"].half())
    ref = mamba_ssm_interface().selective_scan_ref
    out = selective_scan(**kw).float()
    e_half = (ref(**kw).float() - out).abs().max().item()
    e_float = (ref(**dict(kw, z=kw["z"].float())).float() - out).abs().max().item()
    assert e_float < 1e-3 < e_half, (e_float, e_half)


def test_last_state_float64_A():
    # selective_scan_ref cannot run a float64 A (its einsum mixes float32 and float64); the same promotion gives float64
    out, last = selective_scan(**inputs(L=40), return_last_state=True)
    assert out.dtype == last.dtype == torch.float64


def test_golden_selective_scan_ref():
    # data/meepo/golden/ptv3_mamba_golden.npz: mamba_ssm 2.3.2.post1 selective_scan_ref on fixed float32 tensors
    gold = np.load(repo_root() / "data/meepo/golden/ptv3_mamba_golden.npz")
    for name in ("plain", "full"):
        kw = {k: torch.from_numpy(gold[f"scan_{name}_{k}"]).double() for k in "u delta A B C D z delta_bias".split()
              if f"scan_{name}_{k}" in gold}
        out, last = selective_scan_sequential(**kw, delta_softplus=bool(gold[f"scan_{name}_softplus"]), return_last_state=True)
        np.testing.assert_allclose(out.numpy(), gold[f"scan_{name}_out"], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(last.numpy(), gold[f"scan_{name}_last_state"], atol=2e-5, rtol=1e-4)


def test_memory_linear_in_length():
    def peak(L):
        kw = inputs(b=1, d=4, L=L, n=4, dtype=torch.float32)
        return peak_memory(lambda: selective_scan(**kw))
    r = peak(4096) / peak(2048)
    assert 1.8 < r < 2.2, r                                               # quadratic would give 4


@pytest.mark.parametrize("bad,msg", [
    (lambda kw: dict(kw, u=kw["u"][0]), "u must be"),
    (lambda kw: dict(kw, delta=kw["delta"][..., :-1]), "delta must"),
    (lambda kw: dict(kw, A=kw["A"][:-1]), "A must be"),
    (lambda kw: dict(kw, C=kw["C"][:, :-1]), "C must be"),
    (lambda kw: dict(kw, B=kw["A"][:-1]), r"B must be \(dim=3, state=4\)"),                # time-invariant, wrong dim
    (lambda kw: dict(kw, B=torch.randn(2, 2, 4, 10)), "groups dividing dim=3"),            # 2 groups, 3 channels
    (lambda kw: dict(kw, C=torch.randn(2, 0, 4, 10)), "C must be"),
    (lambda kw: dict(kw, C=torch.randn(3, 1, 4, 10)), "C must be"),                        # wrong batch
    (lambda kw: dict(kw, B=kw["B"][None]), "B must be"),
    (lambda kw: dict(kw, D=kw["D"][:-1]), "D must be"),
    (lambda kw: dict(kw, z=kw["z"][..., :-1]), "z must"),
])
def test_bad_shapes(bad, msg):
    with pytest.raises(ValueError, match=msg):
        selective_scan(**bad(inputs(L=10)))


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs(L=5), backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan(**inputs(L=5), backend="cuda")
    with pytest.raises(ValueError, match="B has 1 group.*C has 2"):                     # the kernel reads B's group count
        selective_scan(**inputs(L=5, d=4, B_layout="inv", C_layout=2), backend="cuda")


def test_kernel_groups_rule():
    # mamba-ssm's selective_scan_cuda.fwd: n_groups = B.size(1) if B varies else 1; a varying C must have n_groups
    kw = lambda B, C: kernel_groups_error(**{k: v for k, v in inputs(L=5, d=4, B_layout=B, C_layout=C).items() if k in "BC"})
    assert all(kw(B, C) is None for B, C in [("inv", "inv"), ("var", 1), (2, 2), (2, "inv"), (4, "inv"), ("inv", "var")])
    assert all(kw(B, C) for B, C in [("inv", 2), ("var", 2), (2, "var"), (2, 4)])


def test_complex_A_refused():
    # mamba-ssm's S4D-complex layout: complex A, B and C interleaving real and imaginary parts along L (B, N, 2L)
    kw = inputs(L=10)
    kw = dict(kw, A=kw["A"].to(torch.complex64), B=torch.randn(2, 4, 20), C=torch.randn(2, 4, 20))
    with pytest.raises(ValueError, match="complex A is not supported"):
        selective_scan(**kw)


def test_check_returns_sizes():
    assert check_scan_args(**{k: v for k, v in inputs(b=2, d=3, L=11, n=5).items() if k != "delta_softplus"}) == (2, 3, 11, 5)


@pytest.mark.skipif(not has_cuda_kernel(), reason="needs CUDA and mamba-ssm's compiled selective_scan_cuda")
def test_cuda_kernel_matches_chunked():
    kw = {k: (v.float().cuda() if torch.is_tensor(v) else v) for k, v in inputs(L=500, d=16, n=8).items()}
    out = selective_scan(**kw)                                            # dispatches to selective_scan_fn
    ref = selective_scan(**kw, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    cpu = selective_scan_sequential(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    torch.testing.assert_close(out.cpu().double(), cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not has_cuda_kernel(), reason="needs CUDA and mamba-ssm's compiled selective_scan_cuda")
@pytest.mark.parametrize("L,n", [(257, 1), (3000, 16)])
def test_cuda_kernel_gradients_match_chunked(L, n):
    kw = {k: (v.float().cuda().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in inputs(b=2, d=24, L=L, n=n).items()}
    leaves = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    grads = {}
    for backend in ("cuda", "torch"):
        out = selective_scan(**kw, backend=backend)
        grads[backend] = torch.autograd.grad((out * torch.linspace(-1, 1, L, device="cuda")).sum(), leaves)
    for gk, gt in zip(grads["cuda"], grads["torch"]):
        torch.testing.assert_close(gk, gt, atol=1e-3 * float(gt.abs().max()), rtol=1e-3)


@pytest.mark.skipif(not has_cuda_kernel(), reason="needs CUDA and mamba-ssm's compiled selective_scan_cuda")
@pytest.mark.parametrize("B_layout,C_layout", [("inv", "inv"), ("inv", "var"), ("var", "inv"), (1, "var"), (2, 2), (4, "inv")])
def test_cuda_kernel_bc_layouts_match_chunked(B_layout, C_layout):
    kw = {k: (v.float().cuda().requires_grad_(True) if torch.is_tensor(v) else v)
          for k, v in inputs(b=2, d=8, L=300, n=4, B_layout=B_layout, C_layout=C_layout).items()}
    leaves = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    res = {}
    for backend in ("cuda", "torch"):
        out, last = selective_scan(**kw, backend=backend, return_last_state=True)
        res[backend] = out, last, torch.autograd.grad((out * torch.linspace(-1, 1, 300, device="cuda")).sum(), leaves)
    assert res["cuda"][1].dtype == res["torch"][1].dtype == torch.float32                 # the state in A's dtype
    torch.testing.assert_close(res["cuda"][0], res["torch"][0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(res["cuda"][1], res["torch"][1], atol=1e-4, rtol=1e-3)
    for gk, gt in zip(res["cuda"][2], res["torch"][2]):
        torch.testing.assert_close(gk, gt, atol=1e-3 * float(gt.abs().max()), rtol=1e-3)


@pytest.mark.skipif(not has_cuda_kernel(), reason="needs CUDA and mamba-ssm's compiled selective_scan_cuda")
def test_cuda_kernel_bfloat16_input_close_to_float32():
    kw = {k: (v.float().cuda() if torch.is_tensor(v) else v) for k, v in inputs(b=1, d=32, L=1000, n=4).items()}
    low = {k: (v.bfloat16() if torch.is_tensor(v) and k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    out = selective_scan(**low)
    assert out.dtype == torch.bfloat16
    ref = selective_scan(**kw, backend="torch")
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
