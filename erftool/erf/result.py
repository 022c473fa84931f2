"""ERFResult: the maps, counts, theoretical RF, metrics and protocol of one run,
with .npz save/load (atomic) and a RepLKNet-compatible .npy export."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


def _atomic_write(path: str, writer) -> None:
    """Write through a temporary file in the same directory, then os.replace:
    a crash never leaves a half-written file under `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class ERFResult:
    """Result of `compute_erf`.

    maps: (P, H_in, W_in) float64 mean ERF over the used images, one per probe
        position (summed over input channels, after the rule).
    count / skipped: images used / skipped for a non-finite gradient.
    positions: (P, 2) layer positions, or None for per-image positions.
    image_positions: (N, 2) per-image layer positions (per-image mode) or None.
    per_image: (N, P, H_in, W_in) float32 maps when keep_per_image=True.
    rf_boxes: (P, 4) theoretical RF boxes (y0, x0, y1, x1 inclusive) or None.
    metrics: one metrics.summary dict per position.
    protocol: how the maps were made (layer, layer_size, positions, rule,
        seed, offsets, channels, input_shape, dtype, ...).
    """

    maps: np.ndarray
    count: int
    skipped: int
    protocol: Dict
    positions: Optional[np.ndarray] = None
    image_positions: Optional[np.ndarray] = None
    per_image: Optional[np.ndarray] = None
    rf_boxes: Optional[np.ndarray] = None
    metrics_all: List[Dict] = field(default_factory=list)

    @property
    def map(self) -> np.ndarray:
        """The (H_in, W_in) mean map of the first (usually only) position."""
        return self.maps[0]

    @property
    def rf_box(self):
        """Theoretical RF box of the first position, or None."""
        if self.rf_boxes is None or np.any(self.rf_boxes[0] < 0):
            return None
        return tuple(int(v) for v in self.rf_boxes[0])

    @property
    def metrics(self) -> Dict:
        """Metrics of the first position ({} when not computed)."""
        return self.metrics_all[0] if self.metrics_all else {}

    def save(self, path) -> None:
        """Save to `path` (.npz), atomically."""
        arrays = {"maps": self.maps, "count": np.int64(self.count),
                  "skipped": np.int64(self.skipped),
                  "protocol": np.array(json.dumps(self.protocol)),
                  "metrics": np.array(json.dumps(self.metrics_all))}
        for key in ("positions", "image_positions", "per_image", "rf_boxes"):
            value = getattr(self, key)
            if value is not None:
                arrays[key] = value
        _atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))

    @classmethod
    def load(cls, path) -> "ERFResult":
        with np.load(path, allow_pickle=False) as data:
            get = lambda k: data[k] if k in data.files else None  # noqa: E731
            return cls(maps=data["maps"], count=int(data["count"]), skipped=int(data["skipped"]),
                       protocol=json.loads(str(data["protocol"])), positions=get("positions"),
                       image_positions=get("image_positions"), per_image=get("per_image"),
                       rf_boxes=get("rf_boxes"), metrics_all=json.loads(str(data["metrics"])))

    def export_replknet(self, path, index: int = 0) -> None:
        """Save map `index` as the plain (H, W) .npy matrix that RepLKNet's
        erf/analyze_erf.py loads (its visualize script saves the mean of
        relu(grad) summed over colour channels: use rule="relu", seed="relu")."""
        _atomic_write(path, lambda fh: np.save(fh, np.asarray(self.maps[index], np.float64)))
