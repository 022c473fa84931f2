"""Procedural renderer of the synthetic deformation dataset.

Every sample is a function of (seed, index) only: its parameters are drawn
from numpy's generator seeded with [seed, index] (so any subset renders the
same way in any order or batch), then a whole batch is rasterised at once
with torch.

Geometry. A class shape lives in canonical coordinates q (radius ~1, y down).
It is placed by  p = centre + scale * R(rotation) * S(stretch_angle, stretch) * q,
where S stretches by sqrt(stretch) along stretch_angle and shrinks by it across,
and then warped by a smooth elastic field q -> q + elastic * sum_j v_j sin(k_j.q + phi_j).
`scale` is therefore exactly the object's size in pixels (canonical radius 1
maps to `scale` px before stretch), independent of the class.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("disc", "square", "triangle", "ring", "cross", "star", "glyph-L", "blob")
FILLS = ("solid", "stripes", "checker")
N_WAVES = 3
N_LINES = 3


def sample_params(seed, indices: Sequence[int], *, scale_range, rotation: bool,
                  stretch: float, elastic: float, clutter: bool, size: int,
                  num_classes: int) -> Dict[str, np.ndarray]:
    """Per-sample parameters, stacked along the first axis; `seed` is an int or
    a list of ints (e.g. [seed, split]) that, with the index, seeds each sample."""
    key = [int(v) for v in (seed if isinstance(seed, (list, tuple)) else [seed])]
    rows = [_one(np.random.default_rng(key + [int(i)]), scale_range, rotation, stretch,
                 elastic, clutter, size, num_classes) for i in indices]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _one(rng, scale_range, rotation, stretch, elastic, clutter, size, num_classes):
    lo, hi = scale_range
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    aspect = math.exp(rng.uniform(-math.log(stretch), math.log(stretch))) if stretch > 1 else 1.0
    extent = min(0.75 * scale * math.sqrt(max(aspect, 1 / aspect)), size / 2)
    centre = rng.uniform(extent, size - extent, size=2)  # (y, x)
    wave_angle = rng.uniform(0, 2 * math.pi, N_WAVES)
    wave_freq = rng.uniform(1.5, 3.0, N_WAVES)
    disp_angle = rng.uniform(0, 2 * math.pi, N_WAVES)
    bg = rng.uniform(0.2, 0.8, 3)
    sign = rng.choice((-1.0, 1.0))
    return dict(
        label=np.int64(rng.integers(num_classes)),
        scale=np.float32(scale),
        rotation=np.float32(rng.uniform(0, 2 * math.pi) if rotation else 0.0),
        stretch=np.float32(aspect),
        stretch_angle=np.float32(rng.uniform(0, math.pi)),
        elastic=np.float32(rng.uniform(0, elastic)),
        centre=centre.astype(np.float32),
        wave_k=np.stack([np.cos(wave_angle), np.sin(wave_angle)], 1).astype(np.float32)
        * wave_freq[:, None].astype(np.float32),
        wave_phase=rng.uniform(0, 2 * math.pi, N_WAVES).astype(np.float32),
        wave_dir=np.stack([np.cos(disp_angle), np.sin(disp_angle)], 1).astype(np.float32),
        blob=rng.uniform(0.08, 0.16, 3).astype(np.float32),
        blob_phase=rng.uniform(0, 2 * math.pi, 3).astype(np.float32),
        fill=np.int64(rng.integers(len(FILLS))),
        fill_freq=np.float32(rng.uniform(5, 9)),
        fill_angle=np.float32(rng.uniform(0, math.pi)),
        colour=np.clip(bg + sign * rng.uniform(0.3, 0.5, 3), 0, 1).astype(np.float32),
        bg=bg.astype(np.float32),
        noise_low=rng.normal(0, 1, (3, 4, 4)).astype(np.float32),
        noise_mid=rng.normal(0, 1, (3, 8, 8)).astype(np.float32),
        noise_fine=rng.normal(0, 1, (1, 16, 16)).astype(np.float32),
        lines=rng.uniform(0, size, (N_LINES, 4)).astype(np.float32),
        line_width=rng.uniform(0.7, 1.6, N_LINES).astype(np.float32),
        line_on=(rng.uniform(size=N_LINES) < (0.6 if clutter else 0.0)).astype(np.float32),
        line_colour=rng.uniform(0, 1, (N_LINES, 3)).astype(np.float32),
    )


def _box(q, cy, cx, hy, hx):
    return torch.maximum((q[..., 0] - cy).abs() - hy, (q[..., 1] - cx).abs() - hx)


def _sdf(label: int, q: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Signed distance-like field of class `label` at canonical points q
    (B, H, W, 2) as (y, x); negative inside, in canonical units."""
    y, x = q[..., 0], q[..., 1]
    r = torch.sqrt(y * y + x * x + 1e-12)
    theta = torch.atan2(y, x)
    name = CLASSES[label]
    if name == "disc":
        return r - 0.85
    if name == "square":
        return _box(q, 0, 0, 0.65, 0.65)
    if name == "triangle":  # equilateral, apex up, vertices at radius 0.9
        sides = [y * math.sin(a) + x * math.cos(a) for a in (-math.pi / 2, math.pi / 6,
                                                            5 * math.pi / 6)]
        return torch.stack(sides).amax(0) - 0.45
    if name == "ring":
        return (r - 0.65).abs() - 0.22
    if name == "cross":
        return torch.minimum(_box(q, 0, 0, 0.28, 0.9), _box(q, 0, 0, 0.9, 0.28))
    if name == "star":
        return r - (0.35 + 0.55 * ((1 + torch.cos(5 * theta)) / 2) ** 2)
    if name == "glyph-L":
        return torch.minimum(_box(q, 0, -0.35, 0.85, 0.2), _box(q, 0.65, 0, 0.2, 0.55))
    if name == "blob":
        amp, phase = p["blob"][:, None, None, :], p["blob_phase"][:, None, None, :]
        k = torch.arange(2, 5, dtype=q.dtype)
        wobble = (amp * torch.cos(k * theta[..., None] + phase)).sum(-1)
        return r - 0.72 * (1 + wobble)
    raise AssertionError(name)


def _fill(q: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Texture in [0, 1] in canonical coordinates (so it deforms with the object)."""
    f = p["fill_freq"][:, None, None]
    a = p["fill_angle"][:, None, None]
    along = q[..., 0] * torch.sin(a) + q[..., 1] * torch.cos(a)
    stripes = 0.5 + 0.5 * torch.tanh(3 * torch.sin(f * along))
    checker = 0.5 + 0.5 * torch.tanh(3 * torch.sin(f * q[..., 0]) * torch.sin(f * q[..., 1]))
    kind = p["fill"][:, None, None]
    return torch.where(kind == 0, torch.ones_like(stripes),
                       torch.where(kind == 1, stripes, checker))


def _background(p: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
    def up(t):
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)

    img = p["bg"][:, :, None, None] + 0.10 * up(p["noise_low"]) + 0.05 * up(p["noise_mid"]) \
        + 0.03 * up(p["noise_fine"])
    ys = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    xs = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    for j in range(p["lines"].shape[1]):
        y0, x0, y1, x1 = (p["lines"][:, j, i].view(-1, 1, 1) for i in range(4))
        dy, dx = y1 - y0, x1 - x0
        t = (((ys - y0) * dy + (xs - x0) * dx) / (dy * dy + dx * dx + 1e-6)).clamp(0, 1)
        dist = torch.sqrt((ys - y0 - t * dy) ** 2 + (xs - x0 - t * dx) ** 2)
        w = p["line_width"][:, j].view(-1, 1, 1)
        alpha = ((w / 2 + 0.5 - dist).clamp(0, 1) * p["line_on"][:, j].view(-1, 1, 1))[:, None]
        img = img * (1 - alpha) + p["line_colour"][:, j, :, None, None] * alpha
    return img


def canonical_coordinates(p: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """(B, H, W, 2) canonical (y, x) of every pixel, elastic warp included."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    d = torch.stack([ys, xs], -1)[None] - p["centre"][:, None, None, :]
    th, phi, a = p["rotation"], p["stretch_angle"], p["stretch"]

    def rot(angle):  # rotation matrices acting on (y, x) column vectors
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)

    diag = torch.diag_embed(torch.stack([a.rsqrt(), a.sqrt()], -1))  # inverse stretch
    m = rot(phi) @ diag @ rot(-phi) @ rot(-th) / p["scale"][:, None, None]
    m = m[:, None, None]  # (B, 1, 1, 2, 2): plain broadcasting beats einsum at this size
    dy, dx = d[..., 0], d[..., 1]
    qy = m[..., 0, 0] * dy + m[..., 0, 1] * dx
    qx = m[..., 1, 0] * dy + m[..., 1, 1] * dx
    wy, wx = torch.zeros_like(qy), torch.zeros_like(qx)
    for j in range(N_WAVES):
        k = p["wave_k"][:, j, None, None, :]
        s = torch.sin(qy * k[..., 0] + qx * k[..., 1] + p["wave_phase"][:, j, None, None])
        wy = wy + s * p["wave_dir"][:, j, 0, None, None]
        wx = wx + s * p["wave_dir"][:, j, 1, None, None]
    e = p["elastic"][:, None, None] / N_WAVES
    return torch.stack([qy + e * wy, qx + e * wx], -1)


def render(params: Dict[str, np.ndarray], size: int) -> Dict[str, torch.Tensor]:
    """Rasterise a batch: images (B, 3, H, W) in [0, 1], masks (B, H, W), boxes
    (B, 4) as (y0, x0, y1, x1) with exclusive ends."""
    p = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    n = p["label"].shape[0]
    q = canonical_coordinates(p, size)
    sdf = torch.empty(n, size, size)
    for label in p["label"].unique().tolist():
        idx = (p["label"] == label).nonzero().flatten()
        sub = {k: v[idx] for k, v in p.items()}
        sdf[idx] = _sdf(label, q[idx], sub)
    # ~1 px anti-aliased edge: canonical distance times pixels per unit.
    alpha = (0.5 - sdf * p["scale"][:, None, None]).clamp(0, 1)
    colour = p["colour"][:, :, None, None] * (0.7 + 0.3 * _fill(q, p)[:, None])
    image = _background(p, size) * (1 - alpha[:, None]) + colour * alpha[:, None]
    mask = alpha > 0.5
    rows, cols = mask.any(2), mask.any(1)
    ar = torch.arange(size)
    big = torch.full_like(rows, size, dtype=torch.long)
    boxes = torch.stack([
        torch.where(rows, ar, big).amin(1), torch.where(cols, ar, big).amin(1),
        torch.where(rows, ar + 1, 0).amax(1), torch.where(cols, ar + 1, 0).amax(1),
    ], 1).float()
    return {"image": image.clamp(0, 1), "mask": mask, "bbox": boxes, "label": p["label"],
            "scale": p["scale"], "rotation": p["rotation"], "stretch": p["stretch"],
            "stretch_angle": p["stretch_angle"], "elastic": p["elastic"],
            "centre": p["centre"]}
