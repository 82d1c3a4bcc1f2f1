"""Training loop: bad inputs, the checkpoint file, exact resumption after an interruption at any point, seeded data
order, and the per-epoch loss against an independent computation. Batched seeds (`fit_seeds`): equal in float64 to
the seed-by-seed loop and to `fit`, for an MLP, a small CNN and a small attention model, and their bad inputs."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from paperlab.data import Shapes, digits
from paperlab.core import seed_everything
from paperlab.train import (CHECKPOINT_NAME, evaluate, evaluate_seeds, fit, fit_seeds, fit_seeds_reference,
                            load_checkpoint, predict, shuffled_batches, stack_seeds)


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



# ---- fit_seeds: many seeds as one batched network ----------------------------------------------------------------

@pytest.fixture(scope="module")
def data64():
    "96 training digits in float64."
    x, y = digits(8, "train").tensors
    return TensorDataset(x[:96].double(), y[:96])


def mlp64(seed: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.GELU(), nn.Linear(24, 10)).double()


class FrozenCNN(nn.Module):
    "Convolutions with GroupNorm, a per-seed random buffer and a frozen parameter: what `fit_seeds` holds fixed."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.register_buffer("mix", torch.randn(8, 8))  # differs by seed, never trained
        self.head = nn.Linear(8, 10)
        self.offset = nn.Parameter(torch.randn(10), requires_grad=False)

    def forward(self, x):
        return self.head(self.body(x) @ self.mix) + self.offset


class TinyAttention(nn.Module):
    "The 8 rows of a digit as tokens, one pre-norm softmax self-attention block (2 heads), mean-pooled to 10 logits."
    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed, self.pos = nn.Linear(8, d), nn.Parameter(0.1 * torch.randn(8, d))
        self.norm, self.qkv, self.proj, self.head = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2)) + self.pos  # (B, 8, d)
        B, N, D = t.shape
        q, k, v = self.qkv(self.norm(t)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), -1) @ v
        return self.head((t + self.proj(a.transpose(1, 2).reshape(B, N, D))).mean(1))


SEEDS_KW = dict(epochs=2, lr=5e-3, batch_size=20, weight_decay=0.1)  # 5 batches an epoch, the last of 16


def max_diff(a: list[nn.Module], b: list[nn.Module]) -> float:
    "Largest absolute difference of any parameter or buffer between two lists of same-architecture models."
    return max((p - q).abs().max().item() for ma, mb in zip(a, b, strict=True)
               for p, q in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True))


@pytest.mark.parametrize("make", [mlp64, lambda s: FrozenCNN().double(), lambda s: TinyAttention().double()],
                         ids=["mlp", "cnn", "attention"])
def test_fit_seeds_equals_the_seed_by_seed_loop(data64, make):
    "10 steps of 3 seeds in float64: every parameter and buffer within 1e-10, every step's loss within 1e-12."
    batched = fit_seeds(make, [0, 5, 2], data64, **SEEDS_KW)
    loop = fit_seeds_reference(make, [0, 5, 2], data64, **SEEDS_KW)
    assert max_diff(batched.models, loop.models) < 1e-10
    assert batched.step_losses.shape == (3, 10)
    torch.testing.assert_close(batched.step_losses, loop.step_losses, rtol=0, atol=1e-12)
    for got, want in zip(batched.losses, loop.losses): assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert batched.lrs == pytest.approx(loop.lrs, abs=1e-15)
    # the models trained: 10 AdamW steps at lr 5e-3 move every trainable weight (a model that stayed put fails here)
    for model, start in zip(batched.models, stack_seeds(make, [0, 5, 2]).models):
        for (name, p), q in zip(model.named_parameters(), start.parameters()):
            assert torch.equal(p, q) != p.requires_grad, name


def test_fit_seeds_equals_fit(data64):
    "`fit` itself, seed by seed (its DataLoader through accelerate): same weights, same rates, losses to float32."
    batched = fit_seeds(mlp64, [3, 1], data64, **SEEDS_KW)
    for i, seed in enumerate([3, 1]):
        seed_everything(seed)
        model = mlp64(seed)
        res = fit(model, data64, seed=seed, progress=False, **SEEDS_KW)
        assert max_diff([batched.models[i]], [model]) < 1e-10
        assert batched.losses[i] == pytest.approx(res.losses, rel=1e-6)  # fit sums its epoch loss in float32
        assert batched.lrs == pytest.approx(res.lrs, abs=1e-15)


def test_seeds_differ_and_order_matters(data64):
    "Different seeds give different models; a swapped seed list swaps the models; a shared data order is a different run."
    a = fit_seeds(mlp64, [0, 1], data64, **SEEDS_KW)
    assert max_diff(a.models[:1], a.models[1:]) > 0.05
    swapped = fit_seeds(mlp64, [1, 0], data64, **SEEDS_KW)
    assert max_diff(swapped.models, a.models[::-1]) < 1e-10
    shared = fit_seeds(mlp64, [0, 1], data64, data_seed=7, **SEEDS_KW)
    assert max_diff(shared.models[:1], a.models[:1]) > 1e-3
    assert max_diff(shared.models, fit_seeds_reference(mlp64, [0, 1], data64, data_seed=7, **SEEDS_KW).models) < 1e-10



class Counting(nn.Module):
    "A linear model whose forward counts its calls in a buffer and scales its logits by the count."
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return self.lin(x.flatten(1)) * (1 + 0.05 * self.calls)


def test_buffer_updated_in_forward(data64):
    "A buffer the forward updates in place evolves per seed as in the loop (6 steps: 6 calls) and comes back in the models."
    kw = dict(epochs=1, lr=5e-3, batch_size=16)
    batched = fit_seeds(lambda s: Counting().double(), [0, 1], data64, **kw)
    loop = fit_seeds_reference(lambda s: Counting().double(), [0, 1], data64, **kw)
    assert [m.calls.item() for m in batched.models] == [6.0, 6.0]
    assert max_diff(batched.models, loop.models) < 1e-12

@pytest.mark.parametrize("n, batch_size, epochs, seed", [(10, 3, 3, 0), (12, 4, 2, 7), (5, 8, 1, 2), (1, 1, 2, 3)])
def test_shuffled_batches_are_the_loaders(n, batch_size, epochs, seed):
    "The batches of a DataLoader with a seeded generator, epoch after epoch (n divisible by the batch size or not)."
    loader = DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    want = [b for _ in range(epochs) for b in loader]
    got = shuffled_batches(n, batch_size, epochs, seed)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_fit_seeds_on_tensors_and_dict_items():
    "An (x, y) pair and a dataset of dict items train the same as the equivalent TensorDataset."
    ds = Shapes(24, 8)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))]).double()
    y = torch.tensor([ds[i]["label"] for i in range(len(ds))])
    def make(seed):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()
    kw = dict(epochs=1, lr=1e-2, batch_size=8)
    ref = fit_seeds_reference(make, [0, 1], TensorDataset(x, y), **kw)
    assert max_diff(fit_seeds(make, [0, 1], (x, y), **kw).models, ref.models) < 1e-12
    f32 = fit_seeds(lambda s: make(s).float(), [0, 1], ds, **kw)  # Shapes' own float32 dict items
    assert max_diff([m.double() for m in f32.models], ref.models) < 1e-5


def test_evaluate_seeds(data64):
    models = stack_seeds(mlp64, [0, 1]).models
    x, y = data64.tensors
    assert evaluate_seeds(models, (x, y)) == [evaluate(m, data64) for m in models]
    assert evaluate_seeds(models, data64, batch_size=7) == evaluate_seeds(models, data64)


class RandomForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return F.dropout(self.lin(x.flatten(1)), 0.5, training=self.training)


@pytest.mark.parametrize("make, seeds, kwargs, message", [
    (mlp64, [], {}, "seeds is empty"),
    (mlp64, [0, 1, 0], {}, "seeds has duplicates [0]"),
    (mlp64, [0, 1.5], {}, "seeds must be ints"),
    (mlp64, [0, 1], dict(epochs=0), "epochs must be a positive int, got 0"),
    (mlp64, [0, 1], dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (mlp64, [0, 1], dict(lr=-1.0), "lr must be > 0, got -1.0"),
    (mlp64, [0, 1], dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (lambda s: net(s, p=0.2).double(), [0, 1], {}, "Dropout '3' with p=0.2"),
    (lambda s: nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)).double(), [0, 1], {},
     "BatchNorm1d '2' with running statistics"),
    (lambda s: nn.Sequential(nn.Flatten(), nn.Linear(64, 10 + s)).double(), [0, 1], {},
     "different architecture for seed 1 than for seed 0"),
    (lambda s: "not a model", [0], {}, "make_model must return an nn.Module, got str"),
    (lambda s: RandomForward().double(), [0, 1], {}, "draws random numbers in its forward"),
    (lambda s: net(s, p=0.0), [0, 1], {}, "inputs are torch.float64 but make_model's parameters are torch.float32"),
    (mlp64, [0, 1], dict(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")),
     "loss_fn must return one number per batch, got shape (64,) per seed"),
])
def test_fit_seeds_bad_input(data64, make, seeds, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_seeds(make, seeds, data64, **{"epochs": 1, **kwargs})


def test_fit_seeds_bad_data():
    x = torch.zeros(10, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="train_ds has 10 inputs but 9 labels"):
        fit_seeds(mlp64, [0], (x, torch.zeros(9, dtype=torch.long)), epochs=1)
    with pytest.raises(ValueError, match="train_ds is empty"):
        fit_seeds(mlp64, [0], (x[:0], torch.zeros(0, dtype=torch.long)), epochs=1)
    with pytest.raises(ValueError, match="train_ds given as a pair must be two tensors"):
        fit_seeds(mlp64, [0], (x, [0] * 10), epochs=1)
