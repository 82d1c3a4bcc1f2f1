"""Training loop: bad inputs, the checkpoint file, exact resumption after an interruption at any point, seeded data
order, and the per-epoch loss against an independent computation."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from paperlab.data import Shapes, digits
from paperlab.train import CHECKPOINT_NAME, evaluate, fit, load_checkpoint, predict


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models run fastest on one intra-op thread, and much faster when another process shares the two cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return Subset(digits(8, "train"), range(200))


def net(seed: int = 1, p: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10))


KW = dict(epochs=3, lr=3e-3, batch_size=32, progress=False)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0), "epochs must be a positive int, got 0"),
    (dict(epochs=2, lr=0.0), "lr must be > 0, got 0.0"),
    (dict(epochs=2, batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(epochs=2, weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
])
def test_fit_bad_input(data, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(net(), data, progress=False, **kwargs)


def test_fit_empty_and_bad_batches():
    empty = TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="train_ds is empty"):
        fit(net(), empty, epochs=1, progress=False)
    triples = TensorDataset(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="of length 3"):
        fit(net(), triples, epochs=1, progress=False)


@pytest.mark.parametrize("stop_epoch", [0, 1])
def test_resume_after_epoch_is_exact(tmp_path, data, stop_epoch):
    straight = fit(net(), data, **KW)

    def stop(epoch, loss):
        if epoch == stop_epoch: raise Interrupt

    with pytest.raises(Interrupt):
        fit(net(), data, checkpoint_dir=tmp_path, on_epoch_end=stop, **KW)
    assert load_checkpoint(tmp_path)["epoch"] == stop_epoch + 1
    resumed = fit(net(seed=99), data, checkpoint_dir=tmp_path, **KW)  # a differently initialised model is overwritten
    assert resumed.start_epoch == stop_epoch + 1
    assert resumed.losses == straight.losses and resumed.lrs == straight.lrs
    assert same_weights(resumed.model, straight.model)


def test_crash_inside_an_epoch_resumes_from_last_checkpoint(tmp_path, data):
    "A crash mid-epoch (here: the 10th loss call, inside epoch 2 of 7 steps per epoch) loses only that epoch."
    straight = fit(net(), data, **KW)
    calls = 0

    def flaky_loss(logits, y):
        nonlocal calls
        calls += 1
        if calls == 10: raise Interrupt
        return F.cross_entropy(logits, y)

    with pytest.raises(Interrupt):
        fit(net(), data, checkpoint_dir=tmp_path, loss_fn=flaky_loss, **KW)
    assert load_checkpoint(tmp_path)["epoch"] == 1  # ceil(200 / 32) = 7 steps per epoch: call 10 is in epoch 2
    resumed = fit(net(), data, checkpoint_dir=tmp_path, **KW)
    assert resumed.losses == straight.losses
    assert same_weights(resumed.model, straight.model)


def test_checkpoint_file(tmp_path, data):
    res = fit(net(), data, checkpoint_dir=tmp_path, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary files left behind
    ck = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert set(ck) == {"model", "optimizer", "scheduler", "epoch", "losses", "lrs", "generator", "torch_rng", "config",
                       "cuda_rng"}
    assert ck["epoch"] == 3 and ck["losses"] == res.losses
    assert ck["config"] == dict(epochs=3, lr=3e-3, batch_size=32, weight_decay=0.05, seed=0, n=200)
    assert all(torch.equal(ck["model"][k], v) for k, v in res.model.state_dict().items())
    assert isinstance(ck["generator"], torch.Tensor) and isinstance(ck["torch_rng"], torch.Tensor)


def test_finished_run_is_not_retrained(tmp_path, data):
    first = fit(net(), data, checkpoint_dir=tmp_path, **KW)
    again = fit(net(seed=5), data, checkpoint_dir=tmp_path, **KW)
    assert again.start_epoch == 3 and again.losses == first.losses
    assert same_weights(again.model, first.model)


@pytest.mark.parametrize("change", [dict(epochs=4), dict(lr=1e-3), dict(batch_size=16), dict(seed=1)])
def test_resume_with_other_settings_fails(tmp_path, data, change):
    fit(net(), data, checkpoint_dir=tmp_path, **KW)
    (key, value), = change.items()
    with pytest.raises(ValueError, match=f"different run.*'{key}': \\({KW.get(key, 0)!r}, {value!r}\\)"):
        fit(net(), data, checkpoint_dir=tmp_path, **{**KW, **change})


def test_data_order_follows_seed_not_global_rng(data):
    "Without dropout nothing else is random: the global RNG state must not matter, the seed must."
    a = net(p=0.0); torch.manual_seed(123); ra = fit(a, data, **KW)
    b = net(p=0.0); torch.manual_seed(456); rb = fit(b, data, **KW)
    assert same_weights(a, b) and ra.losses == rb.losses
    c = net(p=0.0); rc = fit(c, data, **{**KW, "seed": 1})
    assert rc.losses != ra.losses


def test_epoch_loss_is_the_sample_mean(data):
    "With a vanishing learning rate the weights stay put, so epoch 1's loss is the data's mean loss at the start."
    model = net(p=0.0)
    logits, y = predict(model, data)
    expected = F.cross_entropy(logits, y).item()  # mean over all 200 samples, batches of 32 then 8
    res = fit(model, data, epochs=1, lr=1e-12, batch_size=32, progress=False)
    assert math.isclose(res.losses[0], expected, rel_tol=1e-5)


def test_custom_loss_and_dict_items():
    "A loss on dict items (Shapes): sum instead of mean scales the reported loss by the batch size, exactly."
    ds = Shapes(24, 16)
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    m = model()
    logits, y = predict(m, ds)
    per_sample = F.cross_entropy(logits, y, reduction="none")
    res = fit(m, ds, epochs=1, lr=1e-12, batch_size=8, progress=False,
              loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="sum"))
    # each batch reports its sum; fit weights it by 8 and divides by 24: mean of 8 * (batch sums) / 24 = 8 * mean
    assert math.isclose(res.losses[0], 8 * per_sample.mean().item(), rel_tol=1e-5)
    assert 0.0 <= evaluate(m, ds) <= 1.0


def test_progress_bar_runs(data, capsys):
    fit(net(), data, epochs=1, batch_size=64, progress=True)
    assert "epoch 1/1" in capsys.readouterr().err
