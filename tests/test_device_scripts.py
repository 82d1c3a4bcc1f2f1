"""The GPU-check scripts (run by hand on a CUDA machine) stay runnable: their CPU smoke mode, and the stored runs they made."""
import json
import os
import subprocess
import sys

from paperlab.core import device_results, repo_root


def test_device_bench_smoke_attention(tmp_path):
    env = {**os.environ, "DEVICE_BENCH_SMOKE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root())}
    subprocess.run([sys.executable, str(repo_root() / "scripts/device_bench.py"), str(tmp_path), "attention"], check=True, env=env,
                   capture_output=True, timeout=120)
    run = json.loads((tmp_path / "attention_cuda.json").read_text())
    for dtype in ("float32", "bfloat16"):
        assert {r["method"] for r in run[dtype]} == {"inline", "mediators"}
        for r in run[dtype]:
            assert len(r["SDPA times (ms)"]) == len(r["method times (ms)"]) == 20 and r["method / memory floor"] > 0


def test_stored_runs_name_their_card_and_agree_with_their_rows():
    for name in ("ssm_cuda", "meepo_cuda", "attention_cuda", "inline_fps_cuda", "sit_speed_cuda"):
        run = device_results(name)
        assert run["env"]["card"].startswith("NVIDIA") and run["env"]["torch"]
    meepo = device_results("meepo_cuda")
    assert meepo["env"]["mamba_kernel"]
    for r in meepo["bfloat16"]:                      # stored medians are the medians of the stored repeats
        times = sorted(r["attention times (ms)"])
        assert abs((times[9] + times[10]) / 2 - r["attention (ms)"]) < 1e-9
