"""The paper's figures from the bundled checkpoints and seeded synthetic data:
(1) ERFs at object centres, small vs large objects; (2) where DK samples its scope and DC
samples the data; (3) ERF size against the (exactly known) object scale."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from erftool import plotting
from erftool.commands.models import bundled_checkpoints, in_channels, load_model, require

RULE = "abs"
SCALE_IMAGES = 48   # synthetic images measured for the ERF-size-vs-scale figure


def _models():
    """[(name, model)] of the bundled checkpoints, in the paper's column order."""
    paths = bundled_checkpoints()
    if not paths:
        raise ValueError("no bundled checkpoints in erftool/checkpoints/ "
                         "(train them first; see `erftool train`)")
    return _load_all(tuple(str(p) for p in paths))


@functools.lru_cache(maxsize=2)
def _load_all(paths: tuple):
    # One load per run of `erftool figures`, shared by the three paper figures.
    import torch
    return [(Path(p).stem, load_model(p, None, torch.device("cpu"))) for p in paths]


@functools.lru_cache(maxsize=4)
def _scene_data(n: int, seed: int, channels: int):
    from erftool.commands.data import synthetic_batch
    return synthetic_batch(n, seed, channels)


def _objects(inputs):
    """[(image index, centre, box, scale)] of every object, sorted by scale."""
    objs = [(i, c, b, s) for i, (cs, bs, ss) in
            enumerate(zip(inputs.centres, inputs.boxes, inputs.scales))
            for c, b, s in zip(cs, bs, ss)]
    if not objs:
        raise ValueError("the synthetic data holds no objects")
    return sorted(objs, key=lambda o: (o[3], o[0]))


def _erf_at(model, image, centre, *, per_image=False):
    """ERF(s) of the unit(s) at object centre(s): the layer unit whose RF is centred
    nearest each centre."""
    from erftool.commands.compare import nearest_cells
    erf = require("erftool.erf")
    x = image[None] if image.dim() == 3 else image
    centres = [centre] if not per_image else centre
    layer, cells = nearest_cells(model, x, None, centres)
    return erf.compute_erf(model, x, layer=layer, rule=RULE, keep_per_image=True, rf=False,
                           metrics=False, position=erf.PerImage(cells, space="layer"))


# ---------------------------------------------------------------- (1) comparison

def figure_comparison(seed: int):
    models = _models()
    inputs = _scene_data(16, seed, in_channels(models[0][1]))
    objs = _objects(inputs)
    picks = [("small object", objs[0]), ("large object", objs[-1])]
    rows, layer = [], None
    for label, (i, centre, box, scale) in picks:
        maps = {}
        for name, model in models:
            res = _erf_at(model, inputs.images[i], centre)
            maps[name] = res.per_image[0, 0]
            layer = res.protocol.get("layer") or "<output>"
        rows.append({"label": f"{label} ({scale:.0f} px)", "image": inputs.display[i],
                     "maps": maps, "centre": centre, "box": box})
    return plotting.object_centre_comparison(
        rows, [n for n, _ in models],
        title=f"ERFs at object centres (orange box = object): layer {layer}, rule {RULE}, "
              f"1 synthetic image per row (seed {seed})")


# ---------------------------------------------------------------- (2) sampling

def _deformable_layer(model, kind: str):
    """(name, module) of the deepest deformable layer with `kind` offsets
    ("kernel" = DK, "data" = DC), found by type."""
    nn_mod = require("erftool.nn")
    found = None
    for name, m in model.named_modules():
        if kind == "kernel" and isinstance(m, nn_mod.DeformKernel2d) \
                and not isinstance(m, nn_mod.DeformKernelConv2d) \
                and getattr(m, "mode", "local") == "local":
            found = (name, m)
        elif kind == "data" and isinstance(m, nn_mod.DeformConv2d):
            found = (name, m)
    return found


def _offsets_at(model, module, image, centre, key):
    """The module's offsets at the output cell covering `centre`, as (K*K, 2) (dy, dx)
    averaged over offset groups, plus the module's input and output sizes."""
    import torch
    nn_mod = require("erftool.nn")
    erf = require("erftool.erf")
    sizes = {}

    def hook(mod, inp, out):
        sizes["in"] = tuple(inp[0].shape[-2:])
        o = out[0] if isinstance(out, tuple) else out
        sizes["out"] = tuple(o.shape[-2:])

    h = module.register_forward_hook(hook)
    nn_mod.set_record_offsets(model, True)
    try:
        with torch.no_grad():
            model(image[None])
        off = module.last_offsets[key][0]
    finally:
        h.remove()
        nn_mod.set_record_offsets(model, False)
    kh, kw = module.kernel_size
    taps = kh * kw
    if off.dim() == 3:  # local: (2*G*taps, Ho, Wo) -> the cell covering the centre
        cell = erf.input_to_layer([centre], tuple(image.shape[-2:]), sizes["out"])[0]
        off = off[:, cell[0], cell[1]]
    else:
        cell = None
    pairs = off.reshape(-1, taps, 2).mean(dim=0).double().cpu().numpy()
    return pairs, cell, sizes


def _dc_points(module, pairs, cell, sizes, image_size):
    """DC sampling points of the output cell, in input-image pixels."""
    kh, kw = module.kernel_size
    (sy, sx), (py, px), (dy, dx) = module.stride, module.padding, module.dilation
    a, b = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    ys = cell[0] * sy - py + a.ravel() * dy + pairs[:, 0]
    xs = cell[1] * sx - px + b.ravel() * dx + pairs[:, 1]
    fy, fx = image_size[0] / sizes["in"][0], image_size[1] / sizes["in"][1]
    # Module-input cell centres -> image pixel centres.
    return np.stack([(ys + 0.5) * fy - 0.5, (xs + 0.5) * fx - 0.5], axis=1)


def figure_sampling(seed: int):
    models = dict(_models())
    dk = next(((n, m) for n, m in models.items() if _deformable_layer(m, "kernel")
               and not _deformable_layer(m, "data")), None)
    dc = next(((n, m) for n, m in models.items() if _deformable_layer(m, "data")), None)
    if dk is None and dc is None:
        raise ValueError("no bundled checkpoint has a deformable layer")
    any_model = (dk or dc)[1]
    inputs = _scene_data(16, seed, in_channels(any_model))
    objs = _objects(inputs)
    picks = [("small", objs[0]), ("medium", objs[len(objs) // 2]), ("large", objs[-1])]
    rows, notes = [], []
    for label, (i, centre, box, scale) in picks:
        row = {"label": f"{label} object ({scale:.0f} px)", "image": inputs.display[i],
               "centre": centre, "box": box}
        img = inputs.images[i]
        if dk is not None:
            lname, mod = _deformable_layer(dk[1], "kernel")
            pairs, _, _ = _offsets_at(dk[1], mod, img, centre, "kernel")
            k = mod.kernel_size[0]
            rig = plotting.sampling.rigid_scope_positions(k, mod.scope[0])
            row.update(dk_points=rig + pairs, kernel_size=k,
                       scope=mod.weight.detach().abs().mean(dim=(0, 1)).cpu().numpy())
            notes.append(f"DK: {dk[0]}.{lname}")
        if dc is not None:
            lname, mod = _deformable_layer(dc[1], "data")
            pairs, cell, sizes = _offsets_at(dc[1], mod, img, centre, "data")
            if cell is not None:
                row["dc_points"] = _dc_points(mod, pairs, cell, sizes, tuple(img.shape[-2:]))
            notes.append(f"DC: {dc[0]}.{lname}")
        rows.append(row)
    used = ", ".join(dict.fromkeys(notes))
    return plotting.sampling_figure(
        rows, title=f"Kernel sampling at object centres ({used}; synthetic seed {seed})")


# ---------------------------------------------------------------- (3) ERF size vs scale

def erf_sizes(model, inputs):
    """(object scales, ERF sigmas) over every object of `inputs`; sigma is the RMS of
    the per-axis standard deviations of |ERF| mass, sqrt((sy^2 + sx^2) / 2), which
    varies continuously (ring-binned radii move in whole pixels)."""
    erf = require("erftool.erf")
    objs = _objects(inputs)
    idx = [o[0] for o in objs]
    centres = [o[1] for o in objs]
    res = _erf_at(model, inputs.images[idx], centres, per_image=True)
    sig = []
    for m in res.per_image[:, 0]:
        sy, sx = erf.metrics.axis_std(np.abs(m.astype(np.float64)))
        sig.append(float(np.sqrt((sy * sy + sx * sx) / 2)))
    return np.array([o[3] for o in objs], dtype=float), np.array(sig), res


def figure_scaling(seed: int):
    models = _models()
    inputs = _scene_data(SCALE_IMAGES, seed, in_channels(models[0][1]))
    series, layer, count = {}, None, 0
    for name, model in models:
        scales, radii, res = erf_sizes(model, inputs)
        series[name] = (scales, radii)
        layer, count = res.protocol.get("layer") or "<output>", len(scales)
    return plotting.scaling_figure(
        series, size_label="ERF size σ = √((σy² + σx²)/2) of |ERF| mass (px)",
        scale_label="object size (px, exact from the generator)",
        title=f"ERF size vs object scale: layer {layer}, rule {RULE}, {count} objects in "
              f"{inputs.count} synthetic images (seed {seed})")
