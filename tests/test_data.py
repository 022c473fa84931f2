"""erftool.data: the synthetic deformation dataset, image folders, the probe image."""
import numpy as np
import pytest
import torch

from erftool.data import (
    CLASSES, ImageFolder, Preprocessing, SyntheticDeformations, image_files, load_image,
    make_loader, normalize, sample_image,
)
from erftool.errors import ErftoolError


def test_samples_are_deterministic_and_order_independent():
    a = SyntheticDeformations(16, seed=3).batch([5, 2, 9])
    b = SyntheticDeformations(16, seed=3).batch([9, 5])
    torch.testing.assert_close(a["image"][0], b["image"][1])
    torch.testing.assert_close(a["image"][2], b["image"][0])
    c = SyntheticDeformations(16, seed=4).batch([5])
    assert not torch.equal(a["image"][0], c["image"][0])
    val = SyntheticDeformations(16, seed=3, split="val").batch([5])
    assert not torch.equal(a["image"][0], val["image"][0])


def test_sample_fields_are_consistent():
    ds = SyntheticDeformations(64, seed=0)
    s = ds.batch(range(64))
    assert s["image"].shape == (64, 3, 64, 64) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["label"].min() >= 0 and s["label"].max() < len(CLASSES)
    for i in range(64):
        ys, xs = torch.nonzero(s["mask"][i], as_tuple=True)
        assert len(ys) > 0
        assert s["bbox"][i].tolist() == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        cy, cx = s["centre"][i].tolist()
        y0, x0, y1, x1 = s["bbox"][i].tolist()
        assert y0 - 2 <= cy <= y1 + 2 and x0 - 2 <= cx <= x1 + 2


def test_scale_is_the_object_size_and_spans_four_times():
    ds = SyntheticDeformations(400, seed=1, rotation=False, stretch=1.0, elastic=0.0,
                               scale_range=(6, 24))
    s = ds.batch(range(400))
    assert s["scale"].min() >= 6 and s["scale"].max() <= 24
    assert s["scale"].max() / s["scale"].min() > 3.5
    discs = (s["label"] == CLASSES.index("disc")).nonzero().flatten()
    for i in discs[:10].tolist():  # a disc has radius 0.85 * scale, exactly known
        area = s["mask"][i].sum().item()
        radius = 0.85 * s["scale"][i].item()
        assert abs(area / (np.pi * radius ** 2) - 1) < 0.15


def test_class_is_not_given_away_by_scale():
    s = SyntheticDeformations(2000, seed=2).batch(range(2000))
    means = [s["scale"][s["label"] == c].mean().item() for c in range(len(CLASSES))]
    assert max(means) / min(means) < 1.25


def test_loader_batches_and_normalize():
    loader = make_loader(SyntheticDeformations(10, seed=0), batch_size=4, shuffle=True, seed=1)
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    again = list(make_loader(SyntheticDeformations(10, seed=0), batch_size=4, shuffle=True,
                             seed=1))
    torch.testing.assert_close(batches[0]["image"], again[0]["image"])
    x = normalize(batches[0]["image"])
    assert abs(x.mean().item()) < 0.5


def test_bad_dataset_arguments():
    with pytest.raises(ErftoolError, match="size"):
        SyntheticDeformations(0)
    with pytest.raises(ErftoolError, match="split"):
        SyntheticDeformations(4, split="dev")
    with pytest.raises(IndexError):
        SyntheticDeformations(4).batch([4])


def _write_png(path, h=10, w=12, channels=3):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    shape = (h, w) if channels == 1 else (h, w, channels)
    mpimg.imsave(path, rng.uniform(0, 1, shape), cmap="gray" if channels == 1 else None)


def test_image_folder(tmp_path):
    _write_png(tmp_path / "a.png")
    _write_png(tmp_path / "b.png", h=20, w=16)
    pre = Preprocessing((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    folder = ImageFolder(tmp_path, pre)
    assert len(folder) == 2
    item = folder[1]
    assert item["image"].shape == (3, 8, 8) and item["raw"].shape == (3, 8, 8)
    torch.testing.assert_close(item["image"], (item["raw"] - 0.5) / 0.25)
    assert load_image(tmp_path / "b.png").shape == (3, 20, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ErftoolError, match="no PNG or JPEG"):
        image_files(tmp_path)
    with pytest.raises(ErftoolError, match="does not exist"):
        image_files(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ErftoolError, match="notes.txt.*not a PNG or JPEG"):
        image_files(tmp_path)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(ErftoolError, match="cannot decode image.*broken.png"):
        ImageFolder(tmp_path)[0]


def test_sample_image_ships_offline():
    img = sample_image()
    assert img.shape[0] == 3 and min(img.shape[1:]) > 100
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.05
