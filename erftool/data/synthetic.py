"""The synthetic deformation dataset as a torch Dataset, and its DataLoader."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ErftoolError
from .render import CLASSES, render, sample_params

# Channel statistics of the rendered images (measured over 2048 samples of
# seed 0: mean 0.49-0.50, std 0.21-0.22), rounded; models trained on the
# dataset expect inputs normalised with them.
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.22, 0.22, 0.22)
# Independent random streams: the same seed never gives the same train and val images.
SPLITS = ("train", "val", "test")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> the range the synthetic-data models expect."""
    mean = images.new_tensor(SYNTHETIC_MEAN).view(1, -1, 1, 1)
    std = images.new_tensor(SYNTHETIC_STD).view(1, -1, 1, 1)
    return (images - mean) / std


class SyntheticDeformations(Dataset):
    """Procedural objects under controlled deformation on cluttered backgrounds.

    Sample `i` depends only on (seed, split, offset + i). Each item is a dict:
    image (3, H, W) float in [0, 1]; label (int64); mask (H, W) bool; bbox
    (y0, x0, y1, x1), ends exclusive; centre (y, x) in pixels, the image
    point the shape's canonical origin maps to (before the small elastic warp);
    scale (px, exact), rotation (rad), stretch (aspect ratio), stretch_angle
    (rad), elastic (warp amplitude, canonical units).

    Classes (`CLASSES`): disc, square, triangle, ring, cross, star, glyph-L,
    blob. Scale, rotation, stretch, fill texture and colours are drawn
    independently of the class, so no single nuisance gives the label away.
    """

    classes = CLASSES

    def __init__(self, size: int = 4096, seed: int = 0, *, image_size: int = 64,
                 scale_range: Sequence[float] = (6.0, 24.0), rotation: bool = True,
                 stretch: float = 1.5, elastic: float = 0.12, clutter: bool = True,
                 offset: int = 0, split: str = "train"):
        if not isinstance(size, int) or size < 1:
            raise ErftoolError(f"SyntheticDeformations: size must be a positive int, got {size!r}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ErftoolError(f"SyntheticDeformations: scale_range must be 0 < lo <= hi, "
                               f"got {tuple(scale_range)!r}")
        if stretch < 1:
            raise ErftoolError(f"SyntheticDeformations: stretch must be >= 1, got {stretch!r}")
        if split not in SPLITS:
            raise ErftoolError(f"SyntheticDeformations: split must be one of {', '.join(SPLITS)}, "
                               f"got {split!r}")
        self.size, self.seed, self.offset, self.split = size, int(seed), int(offset), split
        self.image_size = int(image_size)
        self.options = dict(scale_range=(lo, hi), rotation=bool(rotation), stretch=float(stretch),
                            elastic=float(elastic), clutter=bool(clutter))

    def __len__(self) -> int:
        return self.size

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Render several samples at once; a dict of stacked tensors."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        params = sample_params([self.seed, SPLITS.index(self.split)],
                               [self.offset + i for i in indices],
                               size=self.image_size, num_classes=len(CLASSES), **self.options)
        return render(params, self.image_size)

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        # DataLoader's batched fetch: one vectorised render per batch.
        out = self.batch(indices)
        return [{k: v[j] for k, v in out.items()} for j in range(len(indices))]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def config(self) -> dict:
        """Everything needed to rebuild the dataset (stored in checkpoints)."""
        return dict(name="synthetic-deformations", size=self.size, seed=self.seed,
                    offset=self.offset, split=self.split, image_size=self.image_size, **self.options)


def make_loader(dataset: Dataset, batch_size: int = 64, *, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A single-process DataLoader whose shuffling order depends only on `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, num_workers=0)
