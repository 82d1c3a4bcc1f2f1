"""`fit` across 2 CPU processes (gloo) equals a 1-process run with the same global batch and data order.

Run by pytest, this file launches itself as the training script: `torchrun --standalone --nproc_per_node 2
tests/test_multiprocess.py OUT BATCH` (and the same through `accelerate launch --multi_gpu`), then compares what the
processes wrote with `fit` run here in one process with `batch_size = 2 * BATCH`."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

N, BATCH, EPOCHS = 256, 32, 3  # 2 processes x 32 = a global batch of 64, which divides N (no padded last batch)
BIN = Path(sys.executable).parent


def dataset() -> TensorDataset:
    "A seeded 2-class problem on 8 features, (N, 8) inputs and (N,) labels."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def model() -> nn.Module:
    "A small MLP without dropout (so no process-local randomness enters the steps)."
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def train(batch_size: int, accelerator=None):
    from paperlab.train import fit
    return fit(model(), dataset(), epochs=EPOCHS, batch_size=batch_size, lr=1e-2, seed=3, progress=False,
               accelerator=accelerator)


def worker(out: Path, batch_size: int) -> None:
    "The training script: every process trains and writes its losses and final weights to OUT/rank<r>.pt."
    from paperlab.train import default_accelerator
    torch.set_num_threads(1)
    acc = default_accelerator()
    res = train(batch_size, acc)
    torch.save(dict(world=acc.num_processes, rank=acc.process_index, losses=res.losses,
                    state=res.model.state_dict()), out / f"rank{acc.process_index}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], out: Path) -> list[dict]:
    "Run a launcher command on this file; the per-rank results it wrote, by rank."
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # the point is that it works without it
    r = subprocess.run([*cmd, __file__, str(out), str(BATCH)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]


def close(a: dict, b: dict, atol: float) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


TOL = 1e-5  # float32 all-reduce of the gradient halves vs one sum over the whole batch: differences ~1e-7 per step


def check_two_processes_match_one(ranks: list[dict]) -> None:
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    one = train(2 * BATCH)  # the independent reference: one process, the same global batch
    ref = one.model.state_dict()
    for r in ranks:  # both replicas end with the reference's weights
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(one.losses), rtol=0, atol=TOL)
        assert close(r["state"], ref, TOL), max((r["state"][k] - ref[k]).abs().max().item() for k in ref)
    # the test can fail: a 1-process run with the per-process batch (twice the steps) is far from the 2-process run
    other = train(BATCH).model.state_dict()
    assert not close(ranks[0]["state"], other, 100 * TOL)


def test_torchrun_two_processes_equal_one(tmp_path):
    ranks = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path / "torchrun")
    check_two_processes_match_one(ranks)


def test_accelerate_launch_multi_gpu_runs_two_cpu_processes(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    check_two_processes_match_one(launch(cmd, tmp_path / "accelerate"))


def test_accelerate_launch_cpu_starts_a_single_process(tmp_path):
    "The trap the README warns about (accelerate 1.15): `--cpu --num_processes 2` runs one process, not two."
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    ranks = launch(cmd, tmp_path / "cpu")
    assert [r["world"] for r in ranks] == [1]


def test_check_launch_refuses_a_single_process_state_under_a_launcher(monkeypatch):
    from paperlab.train import check_launch, default_accelerator
    acc = default_accelerator()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="each process would train its own copy"):
        check_launch(acc)
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        train(BATCH, acc)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
