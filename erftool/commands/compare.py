"""`erftool compare`: ERFs of checkpoints on shared inputs, written as figures, tables,
arrays and one HTML report."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erftool import plotting
from erftool.commands.common import Console, parse_position, resolve_device, staged_output
from erftool.commands.models import (Inputs, bundled_checkpoints, folder_inputs,
                                      in_channels, load_model, preprocessing, require,
                                      unique_names)

DEFAULT_SYNTHETIC = 8  # images when no input is named: enough for a stable mean, fast on CPU


@dataclass
class CompareRequest:
    checkpoints: list
    images: str | None = None
    synthetic: int | None = None
    layer: str | None = None
    position: str | None = None
    object_centres: bool = False
    rule: str = "abs"
    arch: str | None = None
    out: str = "erf-out"
    fmt: str = "png"
    seed: int = 0
    device: str = "cpu"
    command: str = "erftool compare"


@dataclass
class ModelERF:
    name: str
    map: np.ndarray                     # (H, W) mean ERF over the inputs
    result: object                      # erftool.erf.ERFResult
    rf_box: tuple | None = None         # end-exclusive (y0, x0, y1, x1) in input pixels
    marker: tuple | None = None         # probed unit, in input pixels, for drawing
    marker_exact: bool = False          # marker from an unclipped RF box (not estimated)


# ---------------------------------------------------------------- inputs

def synthetic_inputs(n: int, seed: int, channels: int) -> Inputs:
    from erftool.commands.data import synthetic_batch
    return synthetic_batch(n, seed, channels)


def resolve_inputs(req: CompareRequest, channels: int, prep: dict) -> Inputs:
    if req.images:
        if req.object_centres:
            raise ValueError("--object-centres needs synthetic images (their objects are known)")
        return folder_inputs(req.images, channels, prep)
    return synthetic_inputs(req.synthetic or DEFAULT_SYNTHETIC, req.seed, channels)


# ---------------------------------------------------------------- ERFs

def recentre(m: np.ndarray, at) -> np.ndarray:
    """Shift map `m` so pixel `at` lands on the map centre (zeros shifted in): ERFs
    probed at different object centres then line up and can be averaged."""
    h, w = m.shape
    dy, dx = h // 2 - int(round(at[0])), w // 2 - int(round(at[1]))
    out = np.zeros_like(m)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    return out


def _exclusive(box) -> tuple | None:
    if box is None:
        return None
    y0, x0, y1, x1 = (int(v) for v in box)
    return (y0, x0, y1 + 1, x1 + 1)


def _layer_to_input(pos, layer_size, input_size):
    """Centre pixel of a layer cell (inverse of erf.input_to_layer), for drawing."""
    return tuple((p + 0.5) * i / l - 0.5 for p, l, i in zip(pos, layer_size, input_size))


def probe_marker(res, input_size, index: int = 0, exact: bool = False):
    """Where to draw the probed unit: the centre of its theoretical RF when the RF lies
    inside the image (exact for symmetric padding), else the cell's pixel block.
    With exact=True, also say which of the two it is."""
    box = None if res.rf_boxes is None else res.rf_boxes[index]
    lp = res.protocol["positions"][index] if res.protocol.get("positions") else None
    if box is not None and box.min() >= 0 and box[0] > 0 and box[1] > 0 \
            and box[2] < input_size[0] - 1 and box[3] < input_size[1] - 1:
        mark = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        return (mark, True) if exact else mark
    mark = None if lp is None else _layer_to_input(lp, res.protocol["layer_size"], input_size)
    return (mark, False) if exact else mark


def share_markers(erfs) -> None:
    """Models probed at the same unit of same-sized maps share one marker: an exact
    (unclipped-RF) one replaces the estimates of models whose RF box is clipped."""
    def key(e):
        p = e.result.protocol
        return (tuple(p["layer_size"]), str(p.get("positions")))
    exact = {key(e): e.marker for e in erfs if e.marker_exact}
    for e in erfs:
        if not e.marker_exact and key(e) in exact:
            e.marker = exact[key(e)]


def _cell_grid(model, input_shape, layer: str, layer_size):
    """(centre cell, its RF centre in pixels, pixels per cell): a cell's theoretical-RF
    centre moves by the total stride per cell. Read off the RFs of two neighbouring
    central cells (unclipped), so padding conventions need no modelling."""
    erf = require("erftool.erf")
    h, w = layer_size
    c0 = np.array([h // 2, w // 2])
    c1 = np.minimum(c0 + 1, np.array([h, w]) - 1)
    boxes = erf.theoretical_rf(model, tuple(input_shape), np.stack([c0, c1]), layer=layer)
    mid = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    step = np.where(c1 > c0, (mid[1] - mid[0]) / np.maximum(c1 - c0, 1), 1.0)
    return c0, mid[0], step


def cell_centres(model, input_shape, layer: str, layer_size, cells) -> np.ndarray:
    """Input-pixel centres (y, x) of layer cells (the centres of their theoretical RFs)."""
    c0, mid, step = _cell_grid(model, input_shape, layer, layer_size)
    return mid + (np.asarray(cells, dtype=float).reshape(-1, 2) - c0) * step


def nearest_cells(model, images, layer, points):
    """(layer name, (N, 2) cells): for each input-pixel point, the unit of the probed
    layer whose RF is centred closest to it -- the "unit at the object centre". (The
    engine's input-space positions take the cell whose pixel block covers the point,
    whose RF centre can sit most of a stride away.)"""
    import torch
    from erftool.erf.layers import default_layer, resolve_layer, run_to_layer
    x = images[:1]
    name = default_layer(model, x) if layer is None else resolve_layer(model, layer)[0]
    with torch.no_grad():
        size = tuple(run_to_layer(model, resolve_layer(model, name)[1], x).shape[-2:])
    c0, mid, step = _cell_grid(model, tuple(images.shape[1:]), name, size)
    cells = np.rint((np.asarray(points, dtype=float).reshape(-1, 2) - mid) / step + c0)
    return name, np.clip(cells, 0, np.array(size) - 1).astype(np.int64)


def model_erf(name, model, inputs: Inputs, *, layer, position, object_centres, rule, device):
    erf = require("erftool.erf")
    x = inputs.images
    if object_centres:
        idx, pts = [], []
        for i, cs in enumerate(inputs.centres):
            for c in cs:
                idx.append(i)
                pts.append(c)
        if not pts:
            raise ValueError("--object-centres: the images have no objects")
        x = x[idx]
        lname, cells = nearest_cells(model, x, layer, pts)
        res = erf.compute_erf(model, x, layer=lname, rule=rule, keep_per_image=True,
                              position=erf.PerImage(cells, space="layer"), device=device,
                              metrics=False)
        # Per-image maps re-centred on their probed unit (the cell covering the object
        # centre, up to a stride away from it) so the mean is an aligned ERF; the
        # engine's RF box is the centre unit's, which is where the probes now sit.
        per = res.per_image[:, 0].astype(np.float64)
        at = cell_centres(model, tuple(x.shape[1:]), res.protocol["layer"],
                          res.protocol["layer_size"], res.image_positions)
        m = np.mean([recentre(p, c) for p, c in zip(per, at)], axis=0)
        res.maps = m[None]
        res.metrics_all = [erf.metrics.summary(m, res.rf_boxes[0] if res.rf_boxes is not None
                                               else None)]
        size = tuple(x.shape[-2:])
        marker = (size[0] // 2, size[1] // 2)
    else:
        res = erf.compute_erf(model, x, layer=layer, rule=rule, position=position, device=device)
        marker, exact = probe_marker(res, tuple(x.shape[-2:]), exact=True)
        m = res.maps[0]
    return ModelERF(name=name, map=np.asarray(m, dtype=np.float64), result=res,
                    rf_box=_exclusive(res.rf_box), marker=marker,
                    marker_exact=object_centres or exact)


def flat_metrics(e: ModelERF) -> dict:
    """One table row: the numbers a reader compares across models."""
    r, met, proto = e.result, e.result.metrics, e.result.protocol
    row = {"model": e.name, "layer": proto.get("layer") or "<output>", "rule": proto["rule"],
           "images": r.count, "skipped": r.skipped}
    std = met.get("std") or [math.nan, math.nan]
    row["std_y"], row["std_x"] = float(std[0]), float(std[1])
    g = met.get("gaussian") or {}
    row["gauss_sigma_y"] = float(g.get("sigma_y", math.nan))
    row["gauss_sigma_x"] = float(g.get("sigma_x", math.nan))
    for t, a in (met.get("area_ratio_log") or {}).items():
        row[f"r{round(float(t) * 100)}_log"] = float(a["ratio"]) if a["reached"] else math.nan
    for t, a in (met.get("area_ratio_raw") or {}).items():
        row[f"r{round(float(t) * 100)}_raw"] = float(a["ratio"]) if a["reached"] else math.nan
    row["eff_area95"] = float((met.get("effective_area_95") or {}).get("fraction", math.nan))
    rf = met.get("rf_size")
    row["rf"] = f"{rf[0]}x{rf[1]}" if rf else "n/a"
    s2r = met.get("std_to_rf") or [math.nan, math.nan]
    row["std_to_rf"] = float(np.nanmean(s2r)) if np.isfinite(s2r).any() else math.nan
    _, _, cum = plotting.radial_profile(e.map)
    row["r50_px"] = plotting.mass_radius(cum, 0.5)
    row["r90_px"] = plotting.mass_radius(cum, 0.9)
    return row


TERMINAL_COLUMNS = ("model", "images", "std_y", "std_x", "r50_px", "r90_px", "r20_log",
                    "r50_log", "r99_log", "eff_area95", "rf", "std_to_rf")


def text_table(rows, columns=TERMINAL_COLUMNS) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(c) for c in cells])


def write_tables(rows, out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(rows, indent=2, default=_json_default) + "\n")
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# ---------------------------------------------------------------- compare

def describe(req: CompareRequest, erfs, inputs: Inputs) -> str:
    layer = erfs[0].result.protocol.get("layer") or "<output>"
    probe = "object centres" if req.object_centres else (
        f"unit {req.position}" if req.position else "centre unit")
    return f"layer {layer}, {probe}, rule {req.rule}, {inputs.count} images, {inputs.source}"


def run_compare(req: CompareRequest, console: Console) -> Path:
    device = resolve_device(req.device)
    position = parse_position(req.position)
    paths = [Path(p) for p in req.checkpoints] or bundled_checkpoints()
    if not paths:
        raise ValueError("no checkpoints given and none bundled in erftool/checkpoints/")
    for p in paths:  # fail on a bad path before any work
        if not p.exists():
            raise FileNotFoundError(2, "No such checkpoint", str(p))
    out = Path(req.out)
    with staged_output(out) as tmp:
        names = unique_names(paths)
        models = []
        with console.progress(list(zip(names, paths)), "loading checkpoints") as bar:
            for name, p in bar:
                models.append((name, load_model(p, req.arch, device)))
        channels = {in_channels(m) for _, m in models}
        if len(channels) > 1:
            raise ValueError(f"the checkpoints expect different input channels {sorted(channels)}")
        inputs = resolve_inputs(req, channels.pop(), preprocessing(models[0][1]))
        erfs = []
        with console.progress(models, "computing ERFs") as bar:
            for name, model in bar:
                erfs.append(model_erf(name, model, inputs, layer=req.layer, position=position,
                                      object_centres=req.object_centres, rule=req.rule,
                                      device=device))
        share_markers(erfs)
        rows = [flat_metrics(e) for e in erfs]
        figures = write_compare_outputs(req, erfs, inputs, rows, tmp, console)
        write_compare_report(req, erfs, inputs, rows, figures, tmp)
    import click
    click.echo(text_table(rows))  # the result: stdout, even with --quiet
    console.info(f"wrote {out}/ (report.html, figures, metrics.json/.csv, ERF arrays)")
    return out


def write_compare_outputs(req, erfs, inputs, rows, out: Path, console) -> list:
    """Figures, tables and arrays; returns [(caption, Figure)] for the report."""
    what = describe(req, erfs, inputs)
    maps = {e.name: e.map for e in erfs}
    rf = {e.name: e.rf_box for e in erfs if e.rf_box is not None}
    marks = {e.name: e.marker for e in erfs if e.marker is not None}
    figs = [
        ("erf_grid_shared", f"ERFs on one shared colour scale: {what}",
         plotting.comparison_grid(maps, mode="shared", positions=marks, rf_boxes=rf,
                                  title=f"ERF, shared scale: {what}")),
        ("erf_grid_normalised", f"ERFs, each normalised to its own peak: {what}",
         plotting.comparison_grid(maps, mode="normalised", positions=marks, rf_boxes=rf,
                                  title=f"ERF, per-model scale: {what}")),
        ("erf_profiles", f"Radial profile and cumulative mass: {what}",
         plotting.profiles_figure(maps, rf_radius={k: (b[2] - b[0]) / 2 for k, b in rf.items()},
                                  title=f"ERF radial profiles: {what}")),
    ]
    with console.progress(figs, "writing figures") as bar:
        for stem, _, fig in bar:
            plotting.save(fig, out / stem, req.fmt)
    write_tables(rows, out)
    for e in erfs:
        e.result.save(out / f"erf_{e.name}.npz")
        e.result.export_replknet(out / f"erf_{e.name}.npy")
    return [(cap, fig) for _, cap, fig in figs]


def write_compare_report(req, erfs, inputs, rows, figures, out: Path) -> None:
    from erftool import report
    settings = {"checkpoints": ", ".join(e.name for e in erfs), "inputs": inputs.source,
                "layer": erfs[0].result.protocol.get("layer") or "<output>",
                "probe": ("object centres (maps re-centred on the probe, then averaged)"
                          if req.object_centres else (req.position or "centre of the layer map")),
                "rule": req.rule, "device": req.device, "seed": req.seed}
    notes = ["Metrics: std_* = per-axis standard deviation of the ERF mass (px); "
             "rNN_log / rNN_raw = RepLKNet high-contribution area ratio at NN% on the "
             "log-scaled / raw map (nan = threshold never reached); r50_px / r90_px = radius "
             "holding 50% / 90% of the mass; eff_area95 = fewest pixels holding 95% of the "
             "mass, as a fraction of the image; std_to_rf = sigma / theoretical RF side."]
    skipped = sum(e.result.skipped for e in erfs)
    if skipped:
        notes.append(f"{skipped} image(s) were skipped for non-finite gradients.")
    report.write_report(out / "report.html", title="erftool ERF comparison",
                        command=req.command,
                        figures=[(cap, plotting.png_bytes(fig)) for cap, fig in figures],
                        metrics=rows, settings=settings, notes=notes)
