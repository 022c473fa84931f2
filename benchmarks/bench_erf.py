"""Benchmark: ERF of N images with compute_erf vs a plain batched forward+backward
and vs a RepLKNet-style per-image loop.

    python benchmarks/bench_erf.py [--images 256] [--size 64] [--batch 64] [--repeats 3]

Prints median wall times and ratios. Target: compute_erf <= 1.2x one batched
forward+backward of the same images (same batch size, same probed map).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from erftool.erf import compute_erf  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-18-like, widths 16/32/64/128 (stages layer1..layer4), + classifier."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        chans, layers, cin = [width, 2 * width, 4 * width, 8 * width], [], width
        for i, c in enumerate(chans):
            layers.append(nn.Sequential(Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-images", type=int, default=None,
                    help="images for the per-image loop (time scaled to --images)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = SmallResNet().to(dev).eval()
    x = torch.randn(args.images, 3, args.size, args.size, device=dev)
    layer = model.layer4

    def batched_fwd_bwd():  # the floor: one forward + one input-backward per batch
        for s in range(0, args.images, args.batch):
            xb = x[s:s + args.batch].clone().requires_grad_(True)
            feats = []
            h = layer.register_forward_hook(lambda m, i, o: feats.append(o))
            model(xb)
            h.remove()
            f = feats[0]
            torch.autograd.grad(f[:, :, f.shape[2] // 2, f.shape[3] // 2].sum(), xb)

    def ours():
        return compute_erf(model, x, layer="layer4", rule="relu", batch_size=args.batch,
                           rf=False, metrics=False)

    n_loop = args.loop_images or args.images

    def per_image_loop():  # RepLKNet's visualize_erf.py: batch size 1, one backward each
        acc = torch.zeros(args.size, args.size, device=dev)
        for i in range(n_loop):
            xi = x[i:i + 1].clone().requires_grad_(True)
            feats = []
            h = layer.register_forward_hook(lambda m, i_, o: feats.append(o))
            model(xi)
            h.remove()
            f = feats[0]
            g, = torch.autograd.grad(F.relu(f[:, :, f.shape[2] // 2, f.shape[3] // 2]).sum(), xi)
            acc += F.relu(g)[0].sum(0)
        return acc / n_loop

    positions = [(i, i) for i in range(4)]  # fits layer4 maps of 4x4 and up

    def ours_multi():
        return compute_erf(model, x, layer="layer4", position=positions, rule="relu",
                           batch_size=args.batch * len(positions), rf=False, metrics=False)

    def ours_multi_loop():
        for p in positions:
            compute_erf(model, x, layer="layer4", position=p, rule="relu",
                        batch_size=args.batch, rf=False, metrics=False)

    ours()  # warm-up
    t_base = median_time(batched_fwd_bwd, args.repeats)
    t_ours = median_time(ours, args.repeats)
    t_loop = median_time(per_image_loop, 1) * args.images / n_loop
    t_multi = median_time(ours_multi, max(1, args.repeats - 1))
    t_multi_loop = median_time(ours_multi_loop, 1)
    print(f"device={dev} threads={torch.get_num_threads()} images={args.images} "
          f"size={args.size} batch={args.batch} repeats={args.repeats}")
    print(f"batched forward+backward (floor) : {t_base:8.3f} s")
    print(f"compute_erf                      : {t_ours:8.3f} s   ratio {t_ours / t_base:5.2f}x "
          f"(target <= 1.2x)")
    print(f"per-image loop (RepLKNet style)  : {t_loop:8.3f} s   ratio {t_loop / t_base:5.2f}x"
          + (f"  (timed on {n_loop} images, scaled)" if n_loop != args.images else ""))
    print(f"compute_erf, 4 positions at once : {t_multi:8.3f} s   vs 4 calls {t_multi_loop:.3f} s "
          f"({t_multi_loop / t_multi:4.2f}x faster)")


if __name__ == "__main__":
    main()
