"""Data module: bad inputs, determinism across access order and workers, collation, and image-folder round trips that
are tedious in the notebook."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from paperlab.data import (COLOR_NAMES, PALETTE, SHAPE_CLASSES, Shapes, ShapeSpec, digits, image_folder, qa,
                           shape_mask, write_image_folder)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="val"), "unknown split 'val'"),
    (dict(size=0), "size must be a positive int, got 0"),
    (dict(test_fraction=1.0), "test_fraction must lie in (0, 1), got 1.0"),
])
def test_digits_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        digits(**kwargs)


def test_digits_split_sizes_and_seed():
    # sklearn rounds the test share up: ceil(0.25 * 1797) = 450 test digits, 1347 train
    assert (len(digits(8, "train")), len(digits(8, "test"))) == (1347, 450)
    a, b = digits(8, "test", seed=0).tensors[0], digits(8, "test", seed=1).tensors[0]
    assert not torch.equal(a, b)
    assert torch.equal(a, digits(8, "test", seed=0).tensors[0])


def test_digits_downsample_keeps_mean():
    # 8 -> 4 with bilinear interpolation and half-pixel centres averages each 2x2 block exactly
    x8, x4 = digits(8, "test").tensors[0], digits(4, "test").tensors[0]
    blocks = x8.reshape(-1, 1, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(x4, blocks)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be a positive int, got 0"),
    (dict(n=5, size=7), "size must be an int >= 8 for max_shapes=1, got 7"),
    (dict(n=5, size=12, max_shapes=3), "size must be an int >= 16 for max_shapes=3, got 12"),
    (dict(n=5, max_shapes=0), "max_shapes must be a positive int, got 0"),
])
def test_shapes_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        Shapes(**kwargs)


def test_shapes_index_errors_and_negative_index():
    ds = Shapes(4, 16)
    with pytest.raises(IndexError, match="index 4 out of range"):
        ds[4]
    assert torch.equal(ds[-1]["image"], ds[3]["image"])
    assert len(list(iter(ds))) == 4  # the sequence protocol stops at IndexError
    with pytest.raises(ValueError, match="unknown shape class -1"):
        shape_mask(-1, 5)


def test_shapes_same_items_through_dataloader_workers():
    "Item i depends only on (seed, i): shuffled, batched, and with worker processes it is the same tensor."
    ds = Shapes(24, 16, seed=7, max_shapes=2)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(24, generator=g).tolist()
    batch = next(iter(DataLoader(torch.utils.data.Subset(ds, idx), batch_size=24, num_workers=2)))
    for row, i in enumerate(idx):
        item = ds[i]
        assert torch.equal(batch["image"][row], item["image"])
        assert torch.equal(batch["mask"][row], item["mask"])
        assert int(batch["label"][row]) == item["label"] and int(batch["count"][row]) == item["count"]


def test_shapes_values_and_areas():
    ds = Shapes(100, 24, seed=5)
    for i in range(100):
        (sp,), bg = ds.layout(i)
        item = ds[i]
        assert item["image"].min() >= 0 and item["image"].max() <= 1
        assert (bg < 0.3).all()  # dark background: every channel below 0.3
        assert int((item["mask"] > 0).sum()) == int(shape_mask(sp.cls, sp.extent).sum())
        if SHAPE_CLASSES[sp.cls] == "cross":
            w = max(2, round(sp.extent / 3))
            assert int((item["mask"] > 0).sum()) == 2 * sp.extent * w - w * w
        t, l, b, r = sp.box
        assert int(item["mask"].sum()) == int(item["mask"][t:b, l:r].sum())  # nothing outside the box


def test_qa_answers_come_from_the_item():
    item = dict(label=2, color=COLOR_NAMES.index("cyan"), count=1,
                mask=torch.zeros(4, 4, dtype=torch.long), instance=torch.zeros(4, 4, dtype=torch.long))
    assert qa(item) == [("what shape is it?", "triangle"), ("what colour is it?", "cyan")]
    # two triangles and a square: instance 1 and 3 are triangles (class 2 -> mask 3), instance 2 a square (mask 2)
    inst = torch.tensor([[1, 0, 2], [0, 0, 0], [3, 3, 0]])
    mask = torch.tensor([[3, 0, 2], [0, 0, 0], [3, 3, 0]])
    got = dict(qa(dict(item, instance=inst, mask=mask), counting=True))
    assert got == {"what shape is the biggest one?": "triangle", "what colour is the biggest one?": "cyan",
                   "how many shapes?": "3", "how many triangles?": "2"}


def test_palette_matches_names():
    assert PALETTE.shape == (len(COLOR_NAMES), 3) and PALETTE.min() >= 0 and PALETTE.max() <= 1
    assert ShapeSpec(0, 0, 2, 3, 5).box == (2, 3, 7, 8)


def test_image_folder_round_trip_with_missing_classes(tmp_path):
    "Only squares and crosses: ImageFolder alone would number them 0 and 1; classes.txt keeps 1 and 3."
    items = [dict(image=torch.full((3, 8, 8), v), label=lab) for v, lab in [(0.12, 1), (0.2, 3), (0.6, 3)]]
    write_image_folder(items, tmp_path)
    ds = image_folder(tmp_path)
    assert ds.classes == list(SHAPE_CLASSES)
    got = sorted((int(x.mean() * 255 + 0.5), y) for x, y in ds)
    assert got == [(31, 1), (51, 3), (153, 3)]  # round(0.12 * 255 = 30.6) = 31, 0.2 * 255 = 51, 0.6 * 255 = 153
    plain = image_folder(tmp_path, classes=("cross", "square"))
    assert sorted(y for _, y in plain) == [0, 0, 1]


def test_image_folder_grayscale_and_tuples(tmp_path):
    ds = digits(8, "test")
    write_image_folder([ds[i] for i in range(5)], tmp_path, classes=[str(d) for d in range(10)])
    back = image_folder(tmp_path)
    for path, y in back.samples:
        i = int(path.rsplit("/", 1)[1].split(".")[0])
        x, _ = back[back.samples.index((path, y))]
        assert y == int(ds[i][1])
        assert x.shape == (3, 8, 8)  # ImageFolder's loader converts to RGB: three equal channels
        assert (x - ds[i][0]).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("item, message", [
    ((torch.full((3, 4, 4), 1.5), 0), "pixel values must lie in [0, 1], got [1.5, 1.5]"),
    ((torch.zeros(2, 4, 4), 0), "expected an image (C, H, W) with C in (1, 3), got shape (2, 4, 4)"),
    ((torch.zeros(3, 4, 4), 4), "label 4 out of range for 4 classes"),
])
def test_write_image_folder_bad_items(tmp_path, item, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        write_image_folder([item], tmp_path)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "circle").mkdir(); (tmp_path / "blob").mkdir()
    from PIL import Image
    for d in ("circle", "blob"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / d / "0.png")
    with pytest.raises(ValueError, match=r"folders \['blob'\]"):
        image_folder(tmp_path, classes=SHAPE_CLASSES)
