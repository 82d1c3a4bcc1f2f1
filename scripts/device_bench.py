"""The book's CUDA checks and benchmarks, run on a GPU machine by `scripts/device_checks.sh` (never by CI: it has no GPU).

Writes JSON files into OUT_DIR, each stamped with the card, driver, torch and CUDA versions:
- ssm_cuda.json: `paperlab.ssm.selective_scan` through mamba-ssm's kernel against the chunked PyTorch scan (same GPU)
  and the float64 sequential reference (CPU), forward and gradients; then time and peak memory of the kernel, the
  chunked scan and mamba-ssm's `selective_scan_ref` against length.
- meepo_cuda.json: PTv3's window attention (SDPA, patch 1024) against MEEPO's mixer (bidirectional Mamba, the
  full-size configuration) at the lengths and widths of each stage of PTv3-base on a ScanNet-size scene.
- attention_cuda.json: InLine and the mediator token mixing against SDPA (FlashAttention in bfloat16) and against the
  memory floor, at the sizes of the chapters' CPU speed sections.
- inline_fps_cuda.json: whole-model images per second, Swin-T / DeiT-T against InLine-Swin-T / InLine-DeiT-T (Fig. 3).
- sit_speed_cuda.json: whole-model forward, SiT-B/2 against SiT-B/2 with 16 mediators, 256 to 1024 px.
The book reads the stored copies under data/gpu/.

    python3 scripts/device_bench.py OUT_DIR [ssm|meepo|attention|inline_fps|sit_speed]   (one step only)
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import paperlab.ssm as paperlab_ssm
from paperlab.attention import attention_macs, inline_attention, inline_attention_centred, memory_floor
from paperlab.core import compare_speed, peak_memory
from paperlab.ssm import has_cuda_kernel, selective_scan, selective_scan_ref, selective_scan_sequential

# points per stage of PTv3-base's U-Net on the book's ScanNet-size room (make_scene(123, spacing=0.02, room=8.0),
# 100k points kept, grid 0.02 m -> 89,903 points; each stage pools 2x2x2 voxels), measured with paperlab.meepo on CPU
SCANNET_STAGE_POINTS = (89903, 52105, 15360, 3460, 876)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL = "cuda" if DEV == "cuda" else "torch"             # the smoke run stands the chunked scan in for the kernel
SMOKE = os.environ.get("DEVICE_BENCH_SMOKE") == "1"        # tiny sizes on CPU: checks this script before a GPU is rented
if SMOKE: SCANNET_STAGE_POINTS = tuple(max(64, p // 400) for p in SCANNET_STAGE_POINTS)


def env() -> dict:
    if DEV == "cpu": return {"card": "none (smoke run)", "mamba_kernel": False}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return {"card": torch.cuda.get_device_name(), "nvidia-smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "mamba_kernel": has_cuda_kernel()}


def scan_inputs(b: int, d: int, L: int, n: int, seed: int = 0, device: str = DEV, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(u=torch.randn(b, d, L, generator=g), delta=torch.rand(b, d, L, generator=g) * 0.5 - 1.0,
              A=-torch.rand(d, n, generator=g) - 0.5, B=torch.randn(b, n, L, generator=g), C=torch.randn(b, n, L, generator=g),
              D=torch.randn(d, generator=g), z=torch.randn(b, d, L, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1)
    return {k: v.to(device).requires_grad_(grad) for k, v in kw.items()} | {"delta_softplus": True}


def scan_errors() -> list[dict]:
    "Kernel vs chunked (GPU, float32) and vs the float64 sequential reference (CPU), forward and input gradients."
    rows = []
    for b, d, L, n in ((2, 16, 500, 8), (1, 96, 4096, 1), (2, 64, 20000, 16))[:1 if SMOKE else 3]:
        kw = scan_inputs(b, d, L, n, grad=True)
        out_k = selective_scan(**kw, backend=KERNEL)
        gk = torch.autograd.grad(out_k.pow(2).sum(), [kw[k] for k in ("u", "delta", "B", "C")])
        out_t = selective_scan(**kw, backend="torch")
        gt = torch.autograd.grad(out_t.pow(2).sum(), [kw[k] for k in ("u", "delta", "B", "C")])
        row = {"B": b, "D": d, "L": L, "N": n, "fwd kernel-chunked": (out_k - out_t).abs().max().item(),
               "fwd scale": out_t.abs().max().item(),
               "grad kernel-chunked (rel)": max(((a - c).abs().max() / c.abs().max()).item() for a, c in zip(gk, gt))}
        if L <= 4096:
            ref = selective_scan_sequential(**{k: (v.detach().double().cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
            row["fwd kernel-sequential64"] = (out_k.detach().double().cpu() - ref).abs().max().item()
        mref = selective_scan_ref(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items()})
        row["fwd kernel-mamba_ref"] = (out_k.detach() - mref).abs().max().item()
        rows.append(row)
        print(row, flush=True)
    return rows


def scan_speed(lengths=(1024, 4096, 16384, 65536, 131072), d: int = 96, n: int = 1) -> list[dict]:
    "Forward time (median of 10, interleaved) and peak memory of the kernel, the chunked scan and selective_scan_ref."
    rows = []
    if SMOKE: lengths = (64, 128)
    for L in lengths:
        kw = scan_inputs(1, d, L, n)
        fns = {"mamba kernel": lambda: selective_scan(**kw, backend=KERNEL),
               "paperlab chunked": lambda: selective_scan(**kw, backend="torch"),
               "mamba selective_scan_ref": lambda: selective_scan_ref(**kw)}
        for name, fn in fns.items():
            if name == "mamba selective_scan_ref" and L > 16384: continue        # a Python loop over L: minutes
            c = compare_speed(fns["mamba kernel"], fn, repeats=10, warmup=2)
            rows.append({"L": L, "D": d, "N": n, "scan": name, "time (ms)": c.candidate_s * 1e3,
                         "kernel time (ms)": c.baseline_s * 1e3, "kernel time / this time": c.ratio, "interval": c.interval,
                         "peak MiB": peak_memory(lambda _x: fn(), kw["u"]) / 2**20})
            print(rows[-1], flush=True)
    return rows


def meepo_mixers(dtype: torch.dtype) -> list[dict]:
    "PTv3-base's window attention vs MEEPO-base's mixer, one block's mixer per stage at ScanNet size; forward only."
    from paperlab.meepo import MambaMixer, WindowAttention, meepo_base, ptv3_base
    pt, me = ptv3_base(), meepo_base()
    stages = [("enc", i, SCANNET_STAGE_POINTS[i], pt.enc_channels[i], pt.enc_num_head[i], pt.enc_depths[i]) for i in range(5)] + \
             [("dec", i, SCANNET_STAGE_POINTS[i], pt.dec_channels[i], pt.dec_num_head[i], pt.dec_depths[i]) for i in range(4)]
    rows = []
    torch.manual_seed(0)                                    # the mixer through mamba-ssm's kernel equals it through the chunked scan
    check = MambaMixer(96, d_state=16, causal=False, directions=((False, 1), (True, 2))).to(DEV)
    x = torch.randn(2, 300 if SMOKE else 3000, 96, device=DEV)
    with torch.no_grad():
        y_kernel = check(x)
        saved, paperlab_ssm.has_cuda_kernel = paperlab_ssm.has_cuda_kernel, lambda: False
        try: y_torch = check(x)
        finally: paperlab_ssm.has_cuda_kernel = saved
    mixer_err = (y_kernel - y_torch).abs().max().item() / y_torch.abs().max().item()
    print(f"MambaMixer: kernel vs chunked scan, max relative error {mixer_err:.2e}", flush=True)
    for part, i, L, C, H, depth in stages:
        torch.manual_seed(0)
        attn = WindowAttention(C, H, pt.enc_patch_size[0], explicit=False).to(DEV).to(dtype).eval()
        mamba = MambaMixer(C, d_state=me.d_state, d_conv=me.d_conv, expand=me.expand, causal=me.causal,
                           directions=me.directions).to(DEV).to(dtype).eval()
        x = torch.randn(1, L, C, device=DEV, dtype=dtype)
        c = compare_speed(attn, mamba, x, repeats=20, warmup=3)
        rows.append({"part": part, "stage": i, "points": L, "channels": C, "heads": H, "blocks": depth, "dtype": str(dtype),
                     "attention (ms)": c.baseline_s * 1e3, "mamba (ms)": c.candidate_s * 1e3,
                     "attention times (ms)": [t * 1e3 for t in c.baseline_times], "mamba times (ms)": [t * 1e3 for t in c.candidate_times],
                     "speed-up (attention/mamba)": c.ratio, "interval": c.interval,
                     "attention peak MiB": peak_memory(attn, x) / 2**20, "mamba peak MiB": peak_memory(mamba, x) / 2**20,
                     "mixer kernel-vs-chunked rel err": mixer_err})
        print({k: v for k, v in rows[-1].items() if "times" not in k}, flush=True)
    return rows


def attention_speed(dtype: torch.dtype) -> list[dict]:
    """The InLine and Mediators chapters' speed sections on the GPU, same sizes (batch 1, 6 heads x 32): SDPA (FlashAttention
    in bfloat16) against InLine's fused form (N = 196 ... 12544) and its centred form, and against the mediator token
    mixing with M = 4, 16, 64 (latent grids 32², 64², 128²); each method also against the memory floor."""
    from paperlab.mediators import mediator_token_mixing
    rows = []
    cases = [("inline", n, None) for n in (196, 784, 3136, 12544)] + [("mediators", s * s, m) for s in (32, 64, 128) for m in (4, 16, 64)]
    if SMOKE: cases = [("inline", 196, None), ("mediators", 256, 4)]
    for name, n, m in cases:
        g = torch.Generator(device=DEV).manual_seed(n)
        q, k, v = (torch.randn(1, 6, n, 32, device=DEV, dtype=dtype, generator=g) for _ in range(3))
        method = inline_attention if name == "inline" else (lambda q, k, v, m=m: mediator_token_mixing(q, k, v, m))
        sc = compare_speed(F.scaled_dot_product_attention, method, q, k, v, repeats=20, warmup=3)
        fl = compare_speed(method, memory_floor, q, k, v, repeats=20, warmup=3)
        mixing_macs = attention_macs("inline", n, 32) if name == "inline" else 4 * n * m * 32   # mediators: two N×M products, twice
        row = {"method": name, "N": n, "M": m, "heads": 6, "head dim": 32, "dtype": str(dtype),
               "SDPA (ms)": sc.baseline_s * 1e3, "method (ms)": sc.candidate_s * 1e3,
               "SDPA times (ms)": [t * 1e3 for t in sc.baseline_times], "method times (ms)": [t * 1e3 for t in sc.candidate_times],
               "speed-up": sc.ratio, "interval": sc.interval, "MACs ratio (SDPA/method)": attention_macs("softmax", n, 32) / mixing_macs,
               "method / memory floor": fl.ratio, "floor (ms)": fl.candidate_s * 1e3,
               "SDPA peak MiB": peak_memory(F.scaled_dot_product_attention, q, k, v) / 2**20,
               "method peak MiB": peak_memory(method, q, k, v) / 2**20}
        if name == "inline":
            row["centred form (ms)"] = compare_speed(inline_attention_centred, inline_attention, q, k, v, repeats=20, warmup=3).baseline_s * 1e3
        rows.append(row)
        print({k_: v_ for k_, v_ in row.items() if "times" not in k_}, flush=True)
    return rows


def inline_fps(dtype: torch.dtype) -> list[dict]:
    """Whole-model throughput behind InLine's Fig. 3(b, c): Swin-T against InLine-Swin-T at windows 7, 14, 28, 56 (224 px),
    DeiT-T against InLine-DeiT-T at 224, 384, 640, 1024 px; timm baselines, random weights, inference, images per second."""
    import timm
    from paperlab.inline import create_inline_model
    cases = [(f"swin window {w}", lambda w=w: timm.create_model("swin_tiny_patch4_window7_224", window_size=w),
              lambda w=w: create_inline_model("inline_swin_tiny", window_size=w), 224, 64) for w in (7, 14, 28, 56)] + \
            [(f"deit {r}px", lambda r=r: timm.create_model("deit_tiny_patch16_224", img_size=r),
              lambda r=r: create_inline_model("inline_deit_tiny", img_size=r), r, 64 if r <= 384 else 16) for r in (224, 384, 640, 1024)]
    if SMOKE:                                                  # tiny stand-ins from the same builders, on CPU
        cases = [("swin window 2", lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2, embed_dim=12,
                                                             num_heads=(1, 1, 1, 1)),
                  lambda: create_inline_model("inline_swin_tiny", img_size=64, window_size=2, embed_dim=12, num_heads=(1, 1, 1, 1)), 64, 1),
                 ("deit 32px", lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, embed_dim=12, num_heads=1),
                  lambda: create_inline_model("inline_deit_tiny", img_size=32, embed_dim=12, num_heads=1), 32, 1)]
    rows = []
    for name, make_base, make_inline, res, batch in cases:
        torch.manual_seed(0)
        base, inl = make_base().to(DEV).to(dtype).eval(), make_inline().to(DEV).to(dtype).eval()
        x = torch.randn(batch, 3, res, res, device=DEV, dtype=dtype)
        c = compare_speed(base, inl, x, repeats=2 if SMOKE else 10, warmup=1 if SMOKE else 3)
        rows.append({"case": name, "resolution": res, "batch": batch, "dtype": str(dtype),
                     "baseline (ms)": c.baseline_s * 1e3, "inline (ms)": c.candidate_s * 1e3,
                     "baseline times (ms)": [t * 1e3 for t in c.baseline_times], "inline times (ms)": [t * 1e3 for t in c.candidate_times],
                     "baseline FPS": batch / c.baseline_s, "inline FPS": batch / c.candidate_s, "FPS ratio": c.ratio, "interval": c.interval})
        print({k: v for k, v in rows[-1].items() if "times" not in k}, flush=True)
        del base, inl
    return rows


def sit_speed(dtype: torch.dtype) -> list[dict]:
    """Whole-model forward time behind the Mediators chapter's +45.4 % claim: SiT-B/2 (softmax attention through SDPA)
    against SiT-B/2 with M = 16 mediators in every block, at 256, 512 and 1024 px (latents 32², 64², 128²), random weights."""
    from paperlab.diffusion import DiT, dit_config
    from paperlab.mediators import mediator_sit
    cases = [(256, 32), (512, 16), (1024, 8)] if not SMOKE else [(64, 1)]
    rows = []
    for res, batch in cases:
        side = res // 8
        over = {"input_size": side} if not SMOKE else {"input_size": side, "hidden_size": 48, "depth": 2, "num_heads": 2}
        torch.manual_seed(0)
        base = DiT(dit_config("DiT-B/2", **over)).to(DEV).to(dtype).eval()
        med = mediator_sit("SiT-B/2", 16, **over).to(DEV).to(dtype).eval()
        x = torch.randn(batch, base.cfg.in_channels, side, side, device=DEV, dtype=dtype)
        t, y = torch.rand(batch, device=DEV, dtype=dtype), torch.randint(0, 1000, (batch,), device=DEV)
        c = compare_speed(base, med, x, t, y, repeats=2 if SMOKE else 10, warmup=1 if SMOKE else 3)
        rows.append({"resolution": res, "latent": side, "tokens": (side // 2) ** 2, "batch": batch, "dtype": str(dtype),
                     "SiT (ms)": c.baseline_s * 1e3, "mediator SiT (ms)": c.candidate_s * 1e3,
                     "SiT times (ms)": [v * 1e3 for v in c.baseline_times], "mediator SiT times (ms)": [v * 1e3 for v in c.candidate_times],
                     "speed-up": c.ratio, "interval": c.interval})
        print({k: v for k, v in rows[-1].items() if "times" not in k}, flush=True)
        del base, med
    return rows


def main(out: str, only: str | None = None) -> None:
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    e = env(); print(e, flush=True)
    def save(name, payload): (out / name).write_text(json.dumps({"env": e, **payload}, indent=1))
    steps = [("ssm_cuda.json", lambda: {"errors": scan_errors(), "speed": scan_speed()}),
             ("meepo_cuda.json", lambda: {"float32": meepo_mixers(torch.float32), "bfloat16": meepo_mixers(torch.bfloat16)}),
             ("attention_cuda.json", lambda: {"float32": attention_speed(torch.float32), "bfloat16": attention_speed(torch.bfloat16)}),
             ("inline_fps_cuda.json", lambda: {"float32": inline_fps(torch.float32), "bfloat16": inline_fps(torch.bfloat16)}),
             ("sit_speed_cuda.json", lambda: {"float32": sit_speed(torch.float32), "bfloat16": sit_speed(torch.bfloat16)})]
    for name, step in steps:
        if only and not name.startswith(only): continue
        if not e["mamba_kernel"] and not SMOKE and name == "ssm_cuda.json":
            print("no mamba-ssm kernel: skipping", name); continue
        t0 = time.time()
        try:
            save(name, step())
        except Exception as err:                                   # keep what the other steps measure
            print(f"{name} failed: {err!r}", flush=True)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
