"""Name -> model factory registry (timm-style `create_model`)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import nn

from ..errors import ErftoolError

OPS = ("rigid", "dc", "dk-local", "dk-global", "dk+dc")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    preprocessing: Optional[dict]  # default input_size / mean / std for its data
    defaults: dict  # config fixed by the name (e.g. op for resnet-tiny-dc)


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, factory, description: str, preprocessing: Optional[dict] = None,
                   **defaults) -> None:
    _REGISTRY[name] = ModelEntry(name, factory, description, preprocessing, defaults)


def normalise_op(op: str) -> str:
    """'dk_local' / 'DK-Local' -> 'dk-local'; 'dk_dc', 'dkdc' -> 'dk+dc'."""
    key = str(op).lower().replace("_", "-")
    key = {"dk-dc": "dk+dc", "dkdc": "dk+dc", "dk": "dk-local", "conv": "rigid"}.get(key, key)
    if key not in OPS:
        raise ErftoolError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
    return key


def _lookup(name: str) -> ModelEntry:
    key = str(name).lower().replace("_", "-").replace("dk-dc", "dk+dc")
    if key in _REGISTRY:
        return _REGISTRY[key]
    try:  # a bare op name means the resnet-tiny variant of that op
        return _REGISTRY["resnet-tiny-" + normalise_op(key)]
    except (ErftoolError, KeyError):
        pass
    raise ErftoolError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")


def model_entry(name: str) -> ModelEntry:
    return _lookup(name)


def list_models() -> Dict[str, str]:
    """{name: one-line description}, sorted by name."""
    return {n: _REGISTRY[n].description for n in sorted(_REGISTRY)}


def create_model(name: str, **config) -> nn.Module:
    """Build a registered model. The result carries `erftool_arch`,
    `erftool_config` (everything needed to rebuild it) and
    `erftool_preprocessing` (its default input size / mean / std), which
    erftool.checkpoint.save records."""
    entry = _lookup(name)
    params = inspect.signature(entry.factory).parameters
    for key in config:
        if key not in params:
            raise ErftoolError(f"model {entry.name!r} has no option {key!r}; options: "
                               f"{', '.join(p for p in params if p not in entry.defaults)}")
        if key in entry.defaults and config[key] is not None:
            fixed = entry.defaults[key]
            given = normalise_op(config[key]) if key == "op" else config[key]
            if given != fixed:
                raise ErftoolError(f"model {entry.name!r} fixes {key}={fixed!r}; got {config[key]!r}")
    full = {**config, **entry.defaults}
    model = entry.factory(**full)
    model.erftool_arch = entry.name
    model.erftool_config = dict(config)
    model.erftool_preprocessing = dict(entry.preprocessing) if entry.preprocessing else None
    return model


def convert_stages(model: nn.Module, op: str, stages, scope=None, prefix: str = "layer") -> int:
    """Replace every k > 1 nn.Conv2d inside `model.<prefix><i>` for i in `stages`
    by `erftool.nn.convert_conv(conv, op, scope)` (weights carried over; the
    scope only matters for DK ops); returns how many convs were replaced."""
    from ..nn import convert_conv

    op = normalise_op(op)
    count = 0
    for stage in stages:
        block = getattr(model, f"{prefix}{stage}", None)
        if block is None:
            raise ErftoolError(f"stage {stage!r} does not exist (no {prefix}{stage} in "
                               f"{type(model).__name__})")
        if op == "rigid":
            continue
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d and max(child.kernel_size) > 1:
                    setattr(parent, child_name, convert_conv(
                        child, op, scope=scope if op.startswith("dk") else None))
                    count += 1
    return count
