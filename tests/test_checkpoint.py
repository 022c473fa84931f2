"""erftool.checkpoint: safe, atomic, self-describing checkpoint files."""
import os
import pickle

import pytest
import torch

from erftool import checkpoint
from erftool.errors import ErftoolError
from erftool.models import create_model
from erftool.nn import DeformKernel2d

TINY = dict(widths=(4, 8, 8))


def test_round_trip_restores_model_preprocessing_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet-tiny-dk-local", **TINY)
    with torch.no_grad():
        model.layer3[0].conv1.kernel_offset.weight.normal_(0, 0.1)  # non-trivial offsets
    model(torch.randn(4, 3, 64, 64))  # move the BN statistics
    path = checkpoint.save(tmp_path / "m.pt", model, metadata={"seed": 3, "accuracy": 0.5,
                                                               "torch": torch.__version__})
    loaded = checkpoint.load(path)
    assert loaded.arch == "resnet-tiny-dk-local" and loaded.config == TINY
    assert loaded.metadata["seed"] == 3 and loaded.metadata["torch"] == str(torch.__version__)
    assert loaded.preprocessing.input_size == (64, 64)
    assert not loaded.model.training
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), model.eval()(x))
    net, pre = loaded  # unpacks as (model, preprocessing)
    assert net is loaded.model and pre is loaded.preprocessing


def test_unsafe_pickles_are_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ErftoolError, match="refusing to load.*arbitrary unpickling"):
        checkpoint.load(path, arch="resnet18")
    assert not marker.exists()


def test_plain_state_dict_needs_arch_and_loads_with_it(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5).eval()
    path = tmp_path / "tv.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ErftoolError, match="plain state_dict.*arch"):
        checkpoint.load(path)
    loaded = checkpoint.load(path, arch="resnet18", num_classes=5)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), model(x))
    assert loaded.preprocessing.input_size == (224, 224)
    # The same rigid file converted on load: DK in stage 4, same function at init.
    dk = checkpoint.load(path, arch="resnet18", num_classes=5, op="dk-local", stages=(4,),
                         scope=5)
    assert isinstance(dk.model.layer4[1].conv2, DeformKernel2d)
    torch.testing.assert_close(dk.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_mismatches_are_reported_by_name(tmp_path):
    state = create_model("resnet18", num_classes=5).state_dict()
    state["fc.extra"] = torch.zeros(1)
    del state["layer2.0.bn1.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ErftoolError) as err:
        checkpoint.load(path, arch="resnet18")
    message = str(err.value)
    assert "layer2.0.bn1.running_mean" in message and "fc.extra" in message
    assert "fc.weight (5, 512) vs model (1000, 512)" in message
    assert "\n" not in message


def test_arch_must_match_the_recorded_one(tmp_path):
    path = checkpoint.save(tmp_path / "m.pt", create_model("linear-stack"))
    with pytest.raises(ErftoolError, match="holds a 'linear-stack' model, not 'resnet18'"):
        checkpoint.load(path, arch="resnet18")


def test_save_is_atomic_and_checks_values(tmp_path, monkeypatch):
    model = create_model("linear-stack")
    path = checkpoint.save(tmp_path / "m.pt", model, metadata={"epochs": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, model, metadata={"epochs": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file survives an interrupted save
    assert os.listdir(tmp_path) == ["m.pt"]  # and no temporary file is left
    with pytest.raises(ErftoolError, match=r"metadata\['hook'\] is a function"):
        checkpoint.save(path, model, metadata={"hook": lambda: 0})
    with pytest.raises(ErftoolError, match="no architecture name"):
        checkpoint.save(tmp_path / "x.pt", torch.nn.Linear(2, 2))


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ErftoolError, match="junk.pt"):
        checkpoint.load(tmp_path / "junk.pt", arch="resnet18")
    with pytest.raises(ErftoolError, match="does not exist"):
        checkpoint.load(tmp_path / "none.pt")


def test_export_drops_the_optimiser_state(tmp_path):
    model = create_model("linear-stack")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 1, 8, 8)).sum().backward()
    opt.step()
    src = checkpoint.save(tmp_path / "a.pt", model, optimizer_state=opt.state_dict())
    assert "optimizer_state" in checkpoint.read(src)
    dst = checkpoint.export(src, tmp_path / "b.pt")
    assert "optimizer_state" not in checkpoint.read(dst)
    torch.testing.assert_close(checkpoint.load(dst).model[0].weight, model[0].weight)
