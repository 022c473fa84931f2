"""The CLI's seeded synthetic inputs: erftool.data's deformation dataset, with each
object's exact centre, box and scale kept for probing and for the figures."""
from __future__ import annotations

from erftool.commands.models import Inputs, _to_channels, require

# The dataset's held-out split: never seen in training or model selection.
SPLIT = "test"


def synthetic_batch(n: int, seed: int, channels: int) -> Inputs:
    """`n` rendered images (seed `seed`), normalised for the synthetic-data models."""
    data = require("erftool.data.synthetic")
    if n < 1:
        raise ValueError(f"--synthetic must be at least 1, got {n}")
    ds = data.SyntheticDeformations(size=n, seed=seed, split=SPLIT)
    b = ds.batch(range(n))
    images = b["image"].float()
    display = [img.permute(1, 2, 0).numpy() for img in images]
    x = _to_channels(data.normalize(images), channels)
    centres = [[tuple(float(v) for v in c)] for c in b["centre"]]
    boxes = [[tuple(int(v) for v in bb)] for bb in b["bbox"]]
    scales = [[float(s)] for s in b["scale"]]
    return Inputs(images=x, display=display, source=f"synthetic test split, seed {seed}",
                  centres=centres, boxes=boxes, scales=scales)
