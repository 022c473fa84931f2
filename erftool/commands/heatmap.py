"""`erftool heatmap`: the ERF of one image drawn over it, theoretical RF outlined; on a
synthetic image, the ERF at its object's centre."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from erftool import plotting
from erftool.commands.common import Console, parse_position, resolve_device
from erftool.commands.compare import (_exclusive, nearest_cells, probe_marker,
                                       synthetic_inputs)
from erftool.commands.models import file_inputs, in_channels, load_model, preprocessing, require


def run_heatmap(*, checkpoint, image, layer, position, rule, arch, out, fmt, device,
                console: Console) -> Path:
    erf = require("erftool.erf")
    dev = resolve_device(device)
    pos = parse_position(position)
    target = Path(out).with_suffix("." + fmt)
    model = load_model(checkpoint, arch, dev)
    channels = in_channels(model)
    name = Path(checkpoint).stem
    cbar, mark_label = "|ERF| (opacity follows value)", "probed unit"
    if image is None:
        image = require("erftool.data").sample_image_path()
    if str(image).startswith("synthetic"):
        seed = _synthetic_seed(image)
        inputs = synthetic_inputs(1, seed, channels)
        centres = inputs.centres[0]
        if pos is not None or not centres:
            res = erf.compute_erf(model, inputs.images, layer=layer, rule=rule, position=pos,
                                  device=dev, metrics=False)
            emap, boxes = res.maps[0], [_exclusive(res.rf_box)]
            marks = [probe_marker(res, tuple(inputs.images.shape[-2:]))]
        else:
            x = inputs.images.expand(len(centres), -1, -1, -1)
            with console.progress([0], "ERF at the object centre(s)") as bar:
                for _ in bar:
                    lname, cells = nearest_cells(model, x, layer, centres)
                    res = erf.compute_erf(model, x, layer=lname, rule=rule, keep_per_image=True,
                                          position=erf.PerImage(cells, space="layer"),
                                          device=dev, rf=False)
            per = np.abs(res.per_image[:, 0].astype(np.float64))
            # Each object's ERF scaled to its own peak, so small objects stay visible.
            emap = np.max([p / p.max() if p.max() > 0 else p for p in per], axis=0)
            lpos = res.image_positions
            boxes = [_exclusive(b) for b in erf.theoretical_rf(
                model, tuple(x.shape[1:]), lpos, layer=res.protocol["layer"], device=dev)]
            marks = [tuple(c) for c in centres]
        display, what = inputs.display[0], f"synthetic, seed {seed}"
        count = 1
        if pos is None and centres:
            cbar = "|ERF| / each object's peak (opacity follows value)"
            mark_label = "object centre (probe: the unit centred nearest)"
    else:
        inputs = file_inputs(image, channels, preprocessing(model))
        res = erf.compute_erf(model, inputs.images, layer=layer, rule=rule, position=pos,
                              device=dev, metrics=False)
        emap, boxes = res.maps[0], [_exclusive(res.rf_box)]
        marks = [probe_marker(res, tuple(inputs.images.shape[-2:]))]
        display, what, count = inputs.display[0], Path(image).name, 1
    layer_name = res.protocol.get("layer") or "<output>"
    fig = plotting.overlay(display, emap, positions=marks, rf_boxes=[b for b in boxes if b],
                           title=f"{name}: ERF at layer {layer_name}, rule {rule}, "
                                 f"{count} image ({what})", cbar_label=cbar,
                           marker_label=mark_label)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: no half-written figure on failure.
    tmp = target.with_name(f".{target.stem}.partial{target.suffix}")
    try:
        plotting.save(fig, tmp, fmt)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _synthetic_seed(spec: str) -> int:
    if spec == "synthetic":
        return 0
    head, _, tail = spec.partition(":")
    if head != "synthetic" or not tail.lstrip("-").isdigit():
        raise ValueError(f"--image {spec!r}: use a file path or 'synthetic[:SEED]'")
    return int(tail)
