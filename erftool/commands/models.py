"""The CLI's view of checkpoints, models and input data: loading them, naming them and
turning images into the tensors a model expects. Wraps erftool.checkpoint,
erftool.models and erftool.data so the commands see one small interface."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence



CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
MAX_SIDE = 256  # folder images larger than this are scaled down: ERFs of big images are slow


def require(module: str):
    """Import an erftool part, or fail with a user-facing message if it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            raise ValueError(f"{module} is not available in this erftool installation") from None
        raise


def bundled_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "checkpoints"


def _paper_key(p: Path):
    """Sort key putting rigid, DC, DK (local), DK (global), DK+DC first, whatever the
    file's naming style (dk_dc.pt, resnet-tiny-dk+dc.pt, ...)."""
    stem = p.stem.lower()
    tokens = stem.replace("-", "_").replace("+", "_").split("_")
    joined = "_".join(tokens)
    if "dk_dc" in joined or "dkdc" in tokens:
        rank = 4
    elif "dk" in tokens and "global" in tokens:
        rank = 3
    elif "dk" in tokens:
        rank = 2
    elif "dc" in tokens:
        rank = 1
    elif "rigid" in tokens:
        rank = 0
    else:
        rank = 5
    return (rank, stem)


def bundled_checkpoints() -> list[Path]:
    d = bundled_dir()
    files = [p for p in d.glob("*") if p.suffix in CHECKPOINT_SUFFIXES] if d.is_dir() else []
    return sorted(files, key=_paper_key)


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique (a.pt in two folders -> a, a-2)."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def load_model(path: str | Path, arch: str | None, device):
    """Load one checkpoint as an eval-mode nn.Module on `device`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "No such checkpoint", str(p))
    if p.is_dir():
        raise ValueError(f"checkpoint {p} is a folder, not a file")
    ckpt = require("erftool.checkpoint")
    try:
        loaded = ckpt.load(str(p), arch=arch)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # corrupt pickles and the like surface as many types
        if type(err).__name__ == "ErftoolError":
            raise
        raise ValueError(f"cannot load checkpoint {p}: {type(err).__name__}: {err}") from None
    model = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "model", loaded)
    # What the file records wins over the zoo defaults (input size, mean / std).
    prep = getattr(loaded, "preprocessing", None)
    if prep is not None and hasattr(prep, "to_dict"):
        model.erftool_preprocessing = prep.to_dict()
    model.erftool_metadata = dict(getattr(loaded, "metadata", {}) or {})
    return model.to(device).eval()


def in_channels(model) -> int:
    """Channels of the model's first convolution (3 when it cannot be told)."""
    import torch
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 4:
            groups = int(getattr(m, "groups", 1) or 1)
            return int(w.shape[1]) * groups
    return 3


@dataclass
class Inputs:
    """A batch the models can all take, plus what the figures need about it."""

    images: object                 # torch (N, C, H, W) float32, normalised as the models expect
    display: list                  # N (H, W[, 3]) arrays in [0, 1] for drawing
    source: str                    # human-readable origin, for titles and the report
    centres: list = field(default_factory=list)   # per image: list of (y, x) object centres
    boxes: list = field(default_factory=list)     # per image: list of (y0, x0, y1, x1)
    scales: list = field(default_factory=list)    # per image: list of object sizes (px)

    @property
    def count(self) -> int:
        return int(self.images.shape[0])


def _to_channels(x, channels: int):
    """(N, C, H, W) -> the model's channel count (grey <-> RGB)."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    raise ValueError(f"images have {c} channels but the model expects {channels}")


def preprocessing(model) -> dict:
    """The model's input size / mean / std, as the zoo records them (may be empty)."""
    prep = getattr(model, "erftool_preprocessing", None)
    return dict(prep) if isinstance(prep, dict) else {}


def normalise(x, prep: dict):
    """(x - mean) / std per channel, when the model records them."""
    import torch
    mean, std = prep.get("mean"), prep.get("std")
    if mean is None or std is None:
        return x
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if m.shape[1] not in (1, x.shape[1]):
        return x
    return (x - m) / s


def image_size(first_shape, prep: dict) -> tuple[int, int]:
    """The model's own input size if it records one, else the image's (<= MAX_SIDE)."""
    if prep.get("input_size"):
        return tuple(int(v) for v in prep["input_size"])
    h, w = first_shape[-2:]
    if max(h, w) > MAX_SIDE:
        f = MAX_SIDE / max(h, w)
        h, w = max(8, round(h * f)), max(8, round(w * f))
    return int(h), int(w)


def _read(path, size):
    """(3, H, W) in [0, 1] via erftool.data (PNG/JPEG, clear errors), resized to size."""
    import torch.nn.functional as F
    data = require("erftool.data")
    img = data.load_image(path)
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False,
                            antialias=True)[0].clamp(0, 1)
    return img


def images_to_inputs(images, channels: int, prep: dict, source: str) -> Inputs:
    import torch
    x = torch.stack(images)
    display = [img.permute(1, 2, 0).numpy() for img in images]
    return Inputs(images=normalise(_to_channels(x, channels), prep), display=display,
                  source=source)


def folder_inputs(folder, channels: int, prep: dict | None = None) -> Inputs:
    """Every image of a folder, resized to the model's input size (or the first
    image's, at most MAX_SIDE) and normalised as the model expects."""
    prep = prep or {}
    data = require("erftool.data")
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--images {p} is a file; give a folder (or use `erftool heatmap`)")
    files = data.image_files(p)
    size = image_size(data.load_image(files[0]).shape, prep)
    return images_to_inputs([_read(f, size) for f in files], channels, prep, f"folder {p}")


def file_inputs(path, channels: int, prep: dict | None = None) -> Inputs:
    prep = prep or {}
    data = require("erftool.data")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--image {p} is a folder; give one image file")
    size = image_size(data.load_image(p).shape, prep)
    return images_to_inputs([_read(p, size)], channels, prep, p.name)

