"""compute_erf: gradient ERFs (Luo et al. 2016) of any eval-mode nn.Module."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import metrics as _metrics
from .backprop import input_gradients
from .inputs import iter_batches
from .layers import default_layer, resolve_layer, run_to_layer
from .offsets import offset_policy
from .positions import PerImage, check_inside, input_to_layer, static_positions
from .result import ERFResult
from .rf import theoretical_rf
from .rules import apply_rule, check_rule

OFFSET_MODES = ("total", "frozen")
SEEDS = ("linear", "relu")


def check_eval(model: nn.Module) -> None:
    """Refuse BatchNorm in training mode: batch statistics couple the images of
    a batch (and the batch-of-positions trick), so the ERF would be wrong."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ValueError(f"BatchNorm {name or type(mod).__name__!r} is in training mode; "
                             f"call model.eval() before compute_erf")
    if model.training:
        warnings.warn("model is in training mode (dropout etc. active); ERFs will be noisy",
                      stacklevel=3)


def _model_device_dtype(model, device):
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is None:
        ref = next((b for b in model.buffers() if b.is_floating_point()), None)
    dev = torch.device(device) if device is not None else (
        ref.device if ref is not None else torch.device("cpu"))
    return dev, (ref.dtype if ref is not None else torch.float32)


def _channel_index(channels, n_channels: int) -> Optional[torch.Tensor]:
    if channels is None:
        return None
    if isinstance(channels, (int, np.integer)):
        channels = [int(channels)]
    idx = torch.as_tensor(list(channels) if not isinstance(channels, torch.Tensor) else channels,
                          dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("channels: empty selection")
    if int(idx.min()) < 0 or int(idx.max()) >= n_channels:
        raise ValueError(f"channels: indices must lie in [0, {n_channels - 1}] "
                         f"(the layer has {n_channels} channels), got {idx.tolist()[:8]}")
    return idx


def compute_erf(model: nn.Module, inputs, *, layer=None, position=None, rule: str = "signed",
                channels=None, batch_size: int = 32, offsets: str = "total",
                seed: str = "linear", keep_per_image: bool = False,
                max_images: Optional[int] = None, rf: bool = True, metrics: bool = True,
                device=None) -> ERFResult:
    """Effective receptive field of one unit (or several) of `model`.

    ERF(i) = mean over images of  sum_c rule( d(sum_{ch in channels} O[ch, j]) / dI[c, i] ),
    with O the probed layer's output and j the probe position.

    Args:
        model: an nn.Module in eval mode (BatchNorm in training mode is refused).
        inputs: a (N, C, H, W) tensor, or any iterable of batches (DataLoader,
            list, generator; items may be tensors, (x, y) tuples or dicts with an
            "image"/"input"/"x" key). Streamed: memory does not grow with N.
        layer: dotted module name ("layer3.1.conv2") or the module itself;
            "" = the model output. Default: the model output if spatial, else the
            last module (in completion order) with a spatial output.
        position: (y, x) on the layer's map (default: centre (H//2, W//2)); a
            list of (y, x) (one map per position, still one backward per batch);
            `PerImage(positions, space="layer"|"input")` for one position per
            image (e.g. object centres); or "batch" to read a "position" entry
            (layer coordinates) from dict batches.
        rule: "signed" (default; raw Jacobian), "abs", "relu" (RepLKNet), "square";
            applied per input channel before the channel sum (see erf.rules).
        channels: layer channels whose gradients are summed (default: all).
        batch_size: most (image, position) pairs per forward/backward pass.
        offsets: "total" (default; full Jacobian incl. the path through offset
            generators) or "frozen" (generated offsets detached: the path-sum
            ERF of the DC/DK theory). Honoured by erftool's deformable modules.
        seed: "linear" (one-hot, Luo et al.) or "relu" (gate the seed by O > 0,
            i.e. the gradient of relu(O).sum() as RepLKNet's script does).
        keep_per_image: also return every image's map (N, P, H, W) float32.
        max_images: stop after this many images.
        rf: compute the theoretical RF box (one extra pass on a surrogate copy).
        metrics: compute `erf.metrics.summary` for each position.
        device: where to run (default: the model's parameters' device).

    Images whose gradient holds NaN/Inf are skipped and counted in `skipped`.
    """
    check_rule(rule)
    if offsets not in OFFSET_MODES:
        raise ValueError(f"unknown offsets mode {offsets!r} (choose from {', '.join(OFFSET_MODES)})")
    if seed not in SEEDS:
        raise ValueError(f"unknown seed {seed!r} (choose from {', '.join(SEEDS)})")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_eval(model)
    dev, dtype = _model_device_dtype(model, device)
    stream = iter_batches(inputs)
    first, first_pos = next(stream)
    probe_x = first[:1].to(dev, dtype)
    with offset_policy(offsets):
        if layer is None:
            name = default_layer(model, probe_x)
        else:
            name, _ = resolve_layer(model, layer)
        _, module = resolve_layer(model, name)
        with torch.no_grad():
            probe = run_to_layer(model, module, probe_x)
    if not (isinstance(probe, torch.Tensor) and probe.dim() == 4):
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ValueError(f"layer {name or '<output>'!r} has no spatial output "
                         f"(output {shape}); pick a layer with an (N, C, H, W) map")
    layer_size = tuple(probe.shape[-2:])
    in_shape = tuple(first.shape[1:])
    chan = _channel_index(channels, probe.shape[1])

    per_image = isinstance(position, PerImage) or (isinstance(position, str) and position == "batch")
    if isinstance(position, str) and position != "batch":
        raise ValueError(f"position: unknown value {position!r}")
    pts = None if per_image else static_positions(position, layer_size)
    n_pos = 1 if per_image else len(pts)

    total = torch.zeros((n_pos,) + in_shape[1:], dtype=torch.float64, device=dev)
    kept, used_pos = [], []
    count = skipped = seen = 0
    chunk = max(1, int(batch_size) // n_pos)

    def batches():
        yield first, first_pos
        yield from stream

    with offset_policy(offsets):
        for images, batch_pos in batches():
            if tuple(images.shape[1:]) != in_shape:
                raise ValueError(f"inputs: all images must share one shape; got "
                                 f"{tuple(images.shape[1:])} after {in_shape}")
            for s in range(0, images.shape[0], chunk):
                if max_images is not None and seen >= max_images:
                    break
                x = images[s:s + chunk]
                if max_images is not None:
                    x = x[:max_images - seen]
                b = x.shape[0]
                if per_image:
                    img_pts = _image_positions(position, batch_pos, s, b, seen,
                                               in_shape[1:], layer_size)
                    pos = torch.as_tensor(img_pts, dtype=torch.long).view(1, b, 2)
                else:
                    pos = torch.as_tensor(pts, dtype=torch.long).view(n_pos, 1, 2).expand(n_pos, b, 2)
                grads = input_gradients(model, module, x.to(dev, dtype), pos, chan, seed)
                maps = apply_rule(grads, rule).sum(dim=2)  # (P, B, H, W)
                finite = torch.isfinite(grads).flatten(2).all(dim=2).all(dim=0)  # (B,)
                good = maps[:, finite].to(torch.float64)
                total += good.sum(dim=1)
                count += int(finite.sum())
                skipped += b - int(finite.sum())
                seen += b
                if keep_per_image:
                    kept.append(maps[:, finite].transpose(0, 1).float().cpu().numpy())
                if per_image:
                    used_pos.append(np.asarray(img_pts)[finite.cpu().numpy()])
            if max_images is not None and seen >= max_images:
                break

    mean = (total / max(count, 1)).cpu().numpy()
    if count == 0:
        mean[:] = np.nan
    protocol = {
        "layer": name, "layer_size": list(layer_size), "rule": rule, "seed": seed,
        "offsets": offsets, "channels": None if chan is None else chan.tolist(),
        "positions": None if per_image else pts.tolist(), "per_image_positions": per_image,
        "input_shape": list(in_shape), "dtype": str(dtype).replace("torch.", ""),
        "images": count, "skipped": skipped,
        "definition": "mean_images sum_c rule(d sum_ch O[ch, y, x] / d I[c])",
    }
    rf_pts = pts if not per_image else np.array([[layer_size[0] // 2, layer_size[1] // 2]])
    boxes = None
    if rf:
        boxes = theoretical_rf(model, in_shape, rf_pts, layer=name, channels=chan, device=dev)
        protocol["rf_positions"] = rf_pts.tolist()
    result = ERFResult(
        maps=mean, count=count, skipped=skipped, protocol=protocol,
        positions=None if per_image else pts,
        image_positions=np.concatenate(used_pos) if per_image and used_pos else None,
        per_image=np.concatenate(kept) if keep_per_image and kept else None,
        rf_boxes=boxes)
    if metrics and count > 0:
        result.metrics_all = [
            _metrics.summary(mean[i], None if boxes is None else boxes[min(i, len(boxes) - 1)])
            for i in range(n_pos)]
    return result


def _image_positions(position, batch_pos, start, b, seen, image_size, layer_size):
    """(b, 2) int layer positions of the images [start, start + b) of a batch."""
    if isinstance(position, PerImage):
        raw = position.positions[seen:seen + b]
        if len(raw) < b:
            raise ValueError(f"PerImage holds {len(position.positions)} positions but more "
                             f"images were streamed")
        if position.space == "input":
            pts = input_to_layer(raw, image_size, layer_size)
        else:
            if np.any(raw != np.round(raw)):
                raise ValueError("PerImage: layer coordinates must be integers")
            pts = raw.astype(np.int64)
    else:
        if batch_pos is None:
            raise ValueError('position="batch" needs dict batches with a "position" entry')
        pts = np.asarray(batch_pos, dtype=np.float64).reshape(-1, 2)[start:start + b]
        pts = np.rint(pts).astype(np.int64)
    check_inside(pts, layer_size, what="per-image position")
    return pts
