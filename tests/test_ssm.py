"""Selective scan: the chunked scan against our float64 loop and mamba-ssm's selective_scan_ref, golden outputs, linear memory, bad shapes, CUDA kernel."""
import numpy as np
import pytest
import torch

from paperlab.core import peak_memory, repo_root
from paperlab.ssm import (check_scan_args, has_cuda_kernel, linear_scan, selective_scan, selective_scan_chunked,
                          selective_scan_ref, selective_scan_sequential)


def inputs(b=2, d=3, L=70, n=4, dtype=torch.float64, seed=0, extras=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    kw = dict(u=r(b, d, L), delta=r(b, d, L), A=-torch.rand(d, n, generator=g, dtype=dtype) * 3, B=r(b, n, L), C=r(b, n, L))
    if extras: kw.update(D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.1, delta_softplus=True)
    else: kw["delta"] = kw["delta"].abs()
    return kw


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
                h = torch.exp(dl[i, d, t] * A[d]) * h + dl[i, d, t] * B[i, :, t] * u[i, d, t]
                y[i, d, t] = (C[i, :, t] * h).sum()
    if "D" in kw: y = y + u * kw["D"].double()[:, None]
    if "z" in kw: y = y * torch.nn.functional.silu(kw["z"].double())
    return y


@pytest.mark.parametrize("L,extras", [(1, True), (37, False), (90, True)])
def test_sequential_equals_naive_loop(L, extras):
    kw = inputs(L=L, extras=extras, b=1, d=2)
    torch.testing.assert_close(selective_scan_sequential(**kw), naive_loop(kw), atol=1e-12, rtol=1e-12)


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
def test_cuda_kernel_bfloat16_input_close_to_float32():
    kw = {k: (v.float().cuda() if torch.is_tensor(v) else v) for k, v in inputs(b=1, d=32, L=1000, n=4).items()}
    low = {k: (v.bfloat16() if torch.is_tensor(v) and k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    out = selective_scan(**low)
    assert out.dtype == torch.bfloat16
    ref = selective_scan(**kw, backend="torch")
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
