"""erftool.training: deterministic, resumable training on the synthetic data (tiny runs)."""
import pytest
import torch

from erftool import checkpoint, training
from erftool.errors import ErftoolError
from erftool.training import lr_at, train

TINY = dict(train_size=24, val_size=16, batch_size=8, quiet=True,
            model_config=dict(widths=(4, 4, 8)))


def _state(path):
    return checkpoint.read(path)["state_dict"]


def test_training_is_deterministic_and_records_metadata(tmp_path):
    a = train("resnet-tiny-rigid", epochs=1, seed=1, out=tmp_path / "a.pt", **TINY)
    b = train("resnet-tiny-rigid", epochs=1, seed=1, out=tmp_path / "b.pt", **TINY)
    for k, v in _state(a).items():
        torch.testing.assert_close(v, _state(b)[k], rtol=0, atol=0)
    meta = checkpoint.load(a).metadata
    assert meta["epochs_done"] == 1 and meta["seed"] == 1
    assert 0 <= meta["val_accuracy"] <= 1 and len(meta["history"]) == 1
    assert "erftool train resnet-tiny-rigid" in meta["command"]
    assert "optimizer_state" in checkpoint.read(a)


def test_resume_after_an_interruption_loses_no_epoch(tmp_path, monkeypatch):
    straight = train("resnet-tiny-dk-local", epochs=2, seed=0, out=tmp_path / "s.pt", **TINY)
    real_save = training.checkpoint.save

    def save_then_die(*args, **kwargs):  # killed right after epoch 1's checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train("resnet-tiny-dk-local", epochs=2, seed=0, out=tmp_path / "r.pt", **TINY)
    monkeypatch.undo()
    assert checkpoint.read(tmp_path / "r.pt")["metadata"]["epochs_done"] == 1
    resumed = train("resnet-tiny-dk-local", epochs=2, seed=0, out=tmp_path / "r.pt",
                    resume=True, **TINY)
    assert checkpoint.read(resumed)["metadata"]["epochs_done"] == 2
    for k, v in _state(straight).items():
        torch.testing.assert_close(v, _state(resumed)[k], rtol=1e-5, atol=1e-6)


def test_existing_output_and_mismatched_resume_are_errors(tmp_path):
    out = train("resnet-tiny-rigid", epochs=1, seed=0, out=tmp_path / "m.pt", **TINY)
    with pytest.raises(ErftoolError, match="exists; pass resume=True"):
        train("resnet-tiny-rigid", epochs=1, seed=0, out=out, **TINY)
    with pytest.raises(ErftoolError, match="cannot resume"):
        train("resnet-tiny-rigid", epochs=2, seed=5, out=out, resume=True, **TINY)
    with pytest.raises(ErftoolError, match="epochs"):
        train("resnet-tiny-rigid", epochs=0, out=tmp_path / "z.pt", **TINY)


def test_learning_rate_schedule():
    assert lr_at(0, 100, 0.1, 10) == pytest.approx(0.01)
    assert lr_at(10, 100, 0.1, 10) == pytest.approx(0.1)
    assert lr_at(100, 100, 0.1, 10) == pytest.approx(0.0, abs=1e-12)


def test_progress_is_shown_unless_quiet(tmp_path, capsys):
    settings = {**TINY, "quiet": False}
    train("resnet-tiny-rigid", epochs=1, seed=0, out=tmp_path / "p.pt", **settings)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "val acc" in err
    train("resnet-tiny-rigid", epochs=1, seed=0, out=tmp_path / "q.pt", **TINY)
    assert capsys.readouterr().err == ""
