"""Probe positions on the probed layer's map.

Positions are (y, x) integer indices on the layer's output map ("layer
coordinates"). `PerImage` carries one position per image, in stream order,
either in layer coordinates or in input-pixel coordinates (mapped by
`input_to_layer`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np


def input_to_layer(points, input_size: Tuple[int, int], layer_size: Tuple[int, int]) -> np.ndarray:
    """Map input-pixel coordinates (y, x) to the layer cell that covers them.

    y_l = floor((y + 0.5) * H_l / H_in), likewise for x, clipped to the map:
    pixel centres are scaled by the map's total stride, which is exact for a
    network whose layers downsample by H_in / H_l with "same" padding (each
    layer cell owns a stride x stride block of pixels).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    scale = np.array([layer_size[0] / input_size[0], layer_size[1] / input_size[1]])
    out = np.floor((pts + 0.5) * scale).astype(np.int64)
    return np.clip(out, 0, np.array(layer_size) - 1)


@dataclass
class PerImage:
    """One probe position per image, in the order the images are streamed.

    positions: (N, 2) array of (y, x); space: "layer" (cells of the probed
    layer's map) or "input" (pixels of the input image, mapped with
    `input_to_layer`). Example: object centres from boxes, space="input".
    """

    positions: Sequence
    space: str = "layer"

    def __post_init__(self):
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 2)
        if self.space not in ("layer", "input"):
            raise ValueError(f"PerImage: space must be 'layer' or 'input', got {self.space!r}")


def centre(layer_size: Tuple[int, int]) -> Tuple[int, int]:
    """The centre cell (H // 2, W // 2), as in Luo et al. and RepLKNet."""
    return layer_size[0] // 2, layer_size[1] // 2


def static_positions(position, layer_size) -> np.ndarray:
    """(P, 2) int array for None, one (y, x), or a list of (y, x)."""
    if position is None:
        pts = np.array([centre(layer_size)], dtype=np.int64)
    else:
        arr = np.asarray(position)
        if arr.dtype.kind not in "iuf" or arr.size == 0 or arr.shape[-1] != 2 or arr.ndim > 2:
            raise ValueError(f"position: expected (y, x) or a list of (y, x), got {position!r}")
        pts = arr.reshape(-1, 2)
        if np.any(pts != np.round(pts)):
            raise ValueError(f"position: layer coordinates must be integers, got {position!r}")
        pts = pts.astype(np.int64)
    check_inside(pts, layer_size)
    return pts


def check_inside(pts: np.ndarray, layer_size, what: str = "position") -> None:
    h, w = layer_size
    bad = (pts[:, 0] < 0) | (pts[:, 0] >= h) | (pts[:, 1] < 0) | (pts[:, 1] >= w)
    if bad.any():
        y, x = pts[np.argmax(bad)]
        raise ValueError(f"{what} ({int(y)}, {int(x)}) is outside the layer's map of size "
                         f"{h}x{w} (valid y in [0, {h - 1}], x in [0, {w - 1}])")
