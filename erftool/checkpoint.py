"""Safe, self-describing checkpoints.

One file holds: format name + version, architecture name + config (to rebuild
the model with erftool.models.create_model), state_dict, preprocessing
(input size, mean / std) and metadata (dataset, seed, epochs, accuracy, ...),
plus optionally the optimiser state for resuming training.

Files are only ever read with torch.load(weights_only=True): a file that
needs arbitrary unpickling is refused, never executed. A plain state_dict
(e.g. a torchvision ResNet checkpoint) is accepted when the architecture is
given. Saving is atomic (temporary file in the same folder + os.replace), so
an interrupted save never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .data.preprocessing import Preprocessing
from .errors import ErftoolError

FORMAT = "erftool-checkpoint"
FORMAT_VERSION = 1
PathLike = Union[str, Path]

__all__ = ["save", "load", "read", "export", "LoadedCheckpoint", "FORMAT", "FORMAT_VERSION"]


@dataclass
class LoadedCheckpoint:
    """What `load` returns. `model` is in eval mode; `preprocessing` turns
    images in [0, 1] into its input. Unpacks as (model, preprocessing)."""

    model: nn.Module
    preprocessing: Preprocessing
    arch: str
    config: Dict[str, Any] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.preprocessing))


def _plain(value: Any, where: str) -> Any:
    """`value` with only types torch.load(weights_only=True) accepts; str
    subclasses (torch.__version__), numpy scalars and paths become plain
    values; anything else is an ErftoolError naming where it sits."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise ErftoolError(f"save: {where} is a {type(value).__name__}, which a safe "
                       f"(weights_only) checkpoint cannot hold")


def save(path: PathLike, model: nn.Module, *, arch: Optional[str] = None,
         config: Optional[Mapping[str, Any]] = None,
         preprocessing: Union[Preprocessing, Mapping, None] = None,
         metadata: Optional[Mapping[str, Any]] = None,
         optimizer_state: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `model` atomically. arch / config / preprocessing default to what
    erftool.models.create_model attached to the model. Every value must be
    loadable with weights_only=True (tensors, numbers, strings, lists, tuples,
    dicts, None)."""
    arch = arch or getattr(model, "erftool_arch", None)
    if not arch:
        raise ErftoolError("save: the model has no architecture name; pass arch= "
                           "(a name from erftool.models.list_models())")
    config = dict(config if config is not None else getattr(model, "erftool_config", {}))
    if preprocessing is None:
        preprocessing = getattr(model, "erftool_preprocessing", None)
    if isinstance(preprocessing, Preprocessing):
        preprocessing = preprocessing.to_dict()
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": str(arch),
        "config": _plain(config, "config"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "preprocessing": _plain(Preprocessing.from_dict(preprocessing).to_dict(),
                                "preprocessing"),
        "metadata": _plain(dict(metadata or {}), "metadata"),
    }
    if optimizer_state is not None:
        payload["optimizer_state"] = _plain(optimizer_state, "optimizer_state")
    target = Path(path)
    if target.is_dir():
        raise ErftoolError(f"save: {str(target)!r} is a folder; give a file path")
    return _write_atomically(payload, target)


def _write_atomically(payload: Dict[str, Any], target: Path) -> Path:
    """torch.save to a temporary file in the target's folder, fsync, os.replace:
    readers see the old file or the new one, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the checkpoint the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read(path: PathLike) -> Dict[str, Any]:
    """The raw contents of a checkpoint file, read with weights_only=True.
    A plain state_dict comes back as {"state_dict": ...} without "format"."""
    p = Path(path)
    if not p.is_file():
        raise ErftoolError(f"checkpoint {str(p)!r} does not exist or is not a file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it contains {found.group(1)}" if found else "it is not a plain weights file"
        raise ErftoolError(
            f"refusing to load {str(p)!r}: {what}, which only arbitrary unpickling could "
            f"rebuild, and that could run code from the file; re-save it as a plain "
            f"state_dict or an erftool checkpoint in a trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ErftoolError(f"cannot read checkpoint {str(p)!r}: {type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                           ) from None
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ErftoolError(f"checkpoint {str(p)!r} has format_version {version!r}; this "
                               f"erftool reads up to {FORMAT_VERSION}")
        return dict(obj)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj)}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return {"state_dict": dict(obj["state_dict"])}  # common {"state_dict": ...} wrappers
    raise ErftoolError(f"checkpoint {str(p)!r} is neither an erftool checkpoint nor a "
                       f"state_dict (found {type(obj).__name__})")


def export(src: PathLike, dst: PathLike) -> Path:
    """Copy an erftool checkpoint without its optimiser state (for distribution:
    smaller, and nothing a user needs to evaluate it); written atomically."""
    raw = read(src)
    if "format" not in raw:
        raise ErftoolError(f"export: {str(src)!r} is a plain state_dict, not an erftool "
                           f"checkpoint")
    raw.pop("optimizer_state", None)
    return _write_atomically(raw, Path(dst))


def _strip_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None if `state` fits `model` exactly, else a one-line description."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label}: {', '.join(items[:5])}{more}")
    return "; ".join(parts) or None


def _rigid_twin(arch: str, config: Mapping[str, Any]) -> Optional[nn.Module]:
    from . import models

    try:
        return models.create_model(arch, **{**config, "op": "rigid"})
    except ErftoolError:  # names that fix their op (resnet-tiny-dc, ...)
        return None


def load(path: PathLike, arch: Optional[str] = None, **config) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint, in eval mode on the CPU.

    arch: required for a plain state_dict (e.g. "resnet50" for a torchvision
    file); for an erftool checkpoint it must match the recorded one if given.
    config: model options; for a plain state_dict they are passed to
    create_model. A rigid state_dict loads into a model with op= set (e.g.
    resnet50 with op="dk-local", stages=(3, 4)): it is loaded into the rigid
    network, whose chosen convs are then converted with their weights.
    """
    from . import models

    raw = read(path)
    state = _strip_prefix(raw["state_dict"])
    if "format" in raw:
        recorded = raw["arch"]
        if arch is not None and models.model_entry(arch).name != models.model_entry(recorded).name:
            raise ErftoolError(f"checkpoint {str(path)!r} holds a {recorded!r} model, "
                               f"not {arch!r}")
        arch, config = recorded, {**raw.get("config", {}), **config}
    elif arch is None:
        raise ErftoolError(f"checkpoint {str(path)!r} is a plain state_dict; give its "
                           f"architecture (arch=, e.g. 'resnet50'; see erftool models)")
    model = models.create_model(arch, **config)
    problem = _mismatch(model, state)
    deform = getattr(model, "erftool_deform", None)
    if problem and "format" not in raw and deform and deform["op"] != "rigid":
        # A rigid (e.g. torchvision) state_dict for a deformable variant: load it into the
        # rigid network, then convert the chosen stages with their weights.
        rigid = _rigid_twin(arch, config)
        if rigid is not None and _mismatch(rigid, state) is None:
            rigid.load_state_dict(state)
            models.convert_stages(rigid, deform["op"], deform["stages"], deform["scope"])
            for attr in ("erftool_arch", "erftool_config", "erftool_preprocessing",
                         "erftool_deform"):
                setattr(rigid, attr, getattr(model, attr))
            model, problem, state = rigid, None, None
    if problem:
        raise ErftoolError(f"checkpoint {str(path)!r} does not fit {arch!r}: {problem}")
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    pre = raw.get("preprocessing") or model.erftool_preprocessing
    return LoadedCheckpoint(model, Preprocessing.from_dict(pre), model.erftool_arch,
                            dict(model.erftool_config), dict(raw.get("metadata", {})))
