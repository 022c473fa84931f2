"""Turning whatever the user passes as `inputs` into a stream of image batches.

Accepted: a tensor (N, C, H, W) or one image (C, H, W); a numpy array of the
same; any iterable of batches (a DataLoader, a list, a generator) whose items
are tensors, (x, y, ...) tuples/lists (the first tensor is the image batch) or
dicts (key "image", "images", "input", "inputs", "x" or "img"; an optional
"position" entry carries per-image probe positions). Batches are yielded one
at a time so memory stays constant whatever the dataset size.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch

IMAGE_KEYS = ("image", "images", "input", "inputs", "x", "img", "pixel_values")


def _as_batch(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"inputs: expected image tensors, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"inputs: expected images of shape (N, C, H, W) or (C, H, W), "
                         f"got shape {tuple(x.shape)}")
    return x


def _split_item(item) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(images, per-image positions or None) from one item of the iterable."""
    if isinstance(item, dict):
        for key in IMAGE_KEYS:
            if key in item:
                pos = item.get("position")
                return _as_batch(item[key]), (None if pos is None else torch.as_tensor(pos))
        raise ValueError(f"inputs: dict batch has none of the image keys {IMAGE_KEYS}; "
                         f"keys are {sorted(map(str, item))}")
    if isinstance(item, (tuple, list)):
        for part in item:
            if isinstance(part, (torch.Tensor, np.ndarray)) and np.ndim(part) in (3, 4):
                return _as_batch(part), None
        raise ValueError("inputs: tuple/list batch holds no image tensor of 3 or 4 dimensions")
    return _as_batch(item), None


def iter_batches(inputs) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (images (B, C, H, W), positions (B, 2) or None); raise on empty input."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        stream = [inputs]
    elif isinstance(inputs, dict):
        stream = [inputs]
    else:
        try:
            stream = iter(inputs)
        except TypeError:
            raise ValueError(f"inputs: expected a tensor or an iterable of batches, "
                             f"got {type(inputs).__name__}") from None
    seen = 0
    for item in stream:
        images, pos = _split_item(item)
        if images.shape[0] == 0:
            continue
        seen += images.shape[0]
        yield images, pos
    if seen == 0:
        raise ValueError("inputs: no images (empty tensor or empty iterable)")
