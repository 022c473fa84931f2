"""`erftool train`: the trainer of erftool.training behind the CLI's error handling."""
from __future__ import annotations

from pathlib import Path

from erftool.commands.common import Console, resolve_device
from erftool.commands.models import require


def run_train(*, arch, out, epochs, seed, device, console: Console, resume=False,
              overwrite=False, train_size=None, val_size=None) -> Path:
    training = require("erftool.training")
    dev = resolve_device(device)
    target = Path(out)
    if target.exists() and target.is_dir():
        raise ValueError(f"--out {target} is a folder; give a checkpoint file path")
    kwargs = {"seed": seed, "device": dev, "out": str(target), "quiet": console.quiet,
              "resume": resume, "overwrite": overwrite}
    for key, value in (("epochs", epochs), ("train_size", train_size), ("val_size", val_size)):
        if value is not None:
            kwargs[key] = value
    # training.train writes its checkpoint atomically after every epoch.
    return Path(training.train(arch, **kwargs) or target)
