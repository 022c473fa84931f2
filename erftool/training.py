"""`erftool train`: fit a zoo model on the synthetic deformation dataset.

Deterministic given the seed: the initial weights come from torch's RNG seeded
with `seed`, epoch e trains on fresh samples (seed, "train", e*train_size + i)
in an order drawn from (seed, e), and the learning rate is a pure function
of the step. So the state after epoch e (weights, BN statistics, optimiser
momentum: all in the checkpoint) is everything needed to continue: a run
interrupted in epoch e+1 resumes from the end of epoch e and ends in exactly
the same place as an uninterrupted one. The checkpoint is rewritten
atomically after every epoch.
"""
from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import checkpoint
from .data import SyntheticDeformations, make_loader, normalize
from .errors import ErftoolError
from .models import create_model, model_entry

VAL_SEED = 0  # one fixed validation set for every model, whatever its seed


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: a function of the step alone."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def evaluate(model, dataset, device, batch_size: int = 256) -> Dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on `dataset`."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in make_loader(dataset, batch_size):
            x = normalize(batch["image"]).to(device)
            y = batch["label"].to(device)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    return {"loss": loss / count, "accuracy": correct / count}


GENERATOR_LR_SCALE = 0.1


def _param_groups(model):
    """Offset generators learn at a tenth of the rate (the usual DCN practice):
    their outputs move every tap of a layer at once."""
    from .nn import DeformableModule

    generator = set()
    for m in model.modules():
        if isinstance(m, DeformableModule):
            for name, p in m.named_parameters():
                if name not in ("weight", "bias"):
                    generator.add(id(p))
    main = [p for p in model.parameters() if id(p) not in generator]
    gen = [p for p in model.parameters() if id(p) in generator]
    groups = [{"params": main, "lr_scale": 1.0}]
    if gen:
        groups.append({"params": gen, "lr_scale": GENERATOR_LR_SCALE})
    return groups


class _Progress:
    """click.progressbar over an epoch's batches showing running loss and
    accuracy; silent when quiet."""

    def __init__(self, total: int, label: str, quiet: bool):
        self.quiet, self.text = quiet, ""
        if not quiet:
            import click

            self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                         item_show_func=lambda _: self.text, show_pos=True)
            self.bar.__enter__()

    def update(self, loss: float, acc: float) -> None:
        if not self.quiet:
            self.text = f"loss {loss:.3f} acc {acc:.1%}"
            self.bar.update(1)

    def close(self) -> None:
        if not self.quiet:
            self.bar.__exit__(None, None, None)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _command(model_name, epochs, seed, out, kw) -> str:
    flags = [f"--epochs {epochs}", f"--seed {seed}"]
    flags += [f"--{k.replace('_', '-')} {v}" for k, v in kw.items()]
    return f"erftool train {model_name} --out {shlex.quote(str(out))} " + " ".join(flags)


def train(model_name: str = "resnet-tiny-rigid", *, epochs: int = 6, seed: int = 0,
          out="model.pt", resume: bool = False, overwrite: bool = False,
          batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4,
          train_size: int = 2048, val_size: int = 1024, device="cpu",
          threads: Optional[int] = None, quiet: bool = False,
          model_config: Optional[dict] = None) -> Path:
    """Train `model_name` and write a checkpoint to `out` after every epoch.

    resume: continue from `out` if it exists (same model and settings), up to
    `epochs` in total. Without resume an existing `out` is an error unless
    overwrite. Returns the checkpoint path. Hyper-parameters: AdamW (fast
    progress in short CPU budgets), `lr` peak (a tenth for offset generators) with a warm-up of
    min(1 epoch, 10% of the steps) then cosine decay, weight decay, gradient
    norm clipped at 5 (offset generators can spike early).
    """
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                             ("train_size", train_size, 1), ("val_size", val_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ErftoolError(f"train: {name} must be an int >= {low}, got {value!r}")
    if not lr > 0:
        raise ErftoolError(f"train: lr must be > 0, got {lr!r}")
    out = Path(out)
    if out.is_dir():
        raise ErftoolError(f"train: out {str(out)!r} is a folder; give a checkpoint file path")
    if out.exists() and not (resume or overwrite):
        raise ErftoolError(f"train: {str(out)!r} exists; pass resume=True to continue it or "
                           f"overwrite=True to start again")
    if threads is not None:
        torch.set_num_threads(int(threads))
    device = torch.device(device)
    arch = model_entry(model_name).name
    model_config = dict(model_config or {})
    settings = dict(batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    train_size=train_size, val_size=val_size)

    torch.manual_seed(seed)
    model = create_model(arch, **model_config).to(device)
    opt = torch.optim.AdamW(_param_groups(model), lr=lr, weight_decay=weight_decay)
    start, history, seconds = 0, [], 0.0
    if resume and out.exists():
        raw = checkpoint.read(out)
        meta = raw.get("metadata", {})
        if raw.get("arch") != arch or raw.get("config", {}) != model_config \
                or meta.get("seed") != seed or meta.get("settings") != settings:
            raise ErftoolError(f"train: cannot resume {str(out)!r}: it was trained as "
                               f"{raw.get('arch')!r} with seed {meta.get('seed')!r} and "
                               f"settings {meta.get('settings')}, not {arch!r} / seed {seed} / "
                               f"{settings}")
        model.load_state_dict(raw["state_dict"])
        if "optimizer_state" in raw:
            opt.load_state_dict(raw["optimizer_state"])
        start, history = int(meta["epochs_done"]), list(meta.get("history", []))
        seconds = float(meta.get("train_seconds", 0.0))
        _say(quiet, f"resuming {arch} from epoch {start} of {epochs}")
        if start >= epochs:
            return out

    steps_per_epoch = math.ceil(train_size / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, min(steps_per_epoch, total // 10))
    val = SyntheticDeformations(val_size, seed=VAL_SEED, split="val")
    extra = {k: v for k, v in settings.items()
             if v != train.__kwdefaults__.get(k)}
    command = _command(arch, epochs, seed, out, extra)
    for epoch in range(start, epochs):
        began = time.perf_counter()
        model.train()
        data = SyntheticDeformations(train_size, seed=seed, split="train",
                                     offset=epoch * train_size)
        loader = make_loader(data, batch_size, shuffle=True, seed=seed * 100_003 + epoch)
        bar = _Progress(steps_per_epoch, f"{arch} epoch {epoch + 1}/{epochs}", quiet)
        run_loss, run_correct, run_count = 0.0, 0, 0
        for i, batch in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = group["lr_scale"] * lr_at(epoch * steps_per_epoch + i, total, lr,
                                                        warmup)
            x = normalize(batch["image"]).to(device)
            y = batch["label"].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                bar.close()
                raise ErftoolError(f"train: loss became {float(loss)} at epoch {epoch + 1}, "
                                   f"step {i + 1}; try a smaller lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            run_loss += loss.item() * len(y)
            run_correct += int((logits.argmax(1) == y).sum())
            run_count += len(y)
            bar.update(run_loss / run_count, run_correct / run_count)
        bar.close()
        metrics = evaluate(model, val, device)
        seconds += time.perf_counter() - began
        history.append({"epoch": epoch + 1, "train_loss": run_loss / run_count,
                        "train_accuracy": run_correct / run_count,
                        "val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"],
                        "seconds": time.perf_counter() - began})
        _say(quiet, f"epoch {epoch + 1}/{epochs}: train acc {run_correct / run_count:.1%}, "
                    f"val acc {metrics['accuracy']:.1%} ({history[-1]['seconds']:.0f} s)")
        metadata = {
            "dataset": data.config() | {"offset": 0, "size_per_epoch": train_size},
            "val_dataset": val.config(), "seed": seed, "epochs_done": epoch + 1,
            "epochs": epochs, "settings": settings, "history": history,
            "val_accuracy": metrics["accuracy"], "train_seconds": seconds,
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "command": command, "classes": list(SyntheticDeformations.classes),
        }
        checkpoint.save(out, model, metadata=metadata, optimizer_state=opt.state_dict())
    return out
