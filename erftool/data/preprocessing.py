"""How a model wants its input: size and per-channel mean / std."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ErftoolError


@dataclass(frozen=True)
class Preprocessing:
    """input_size: (H, W) the model was trained at, or None (any size);
    mean / std: per channel, applied to images in [0, 1]."""

    input_size: Optional[Tuple[int, int]] = None
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Preprocessing":
        if not d:
            return cls()
        unknown = set(d) - {"input_size", "mean", "std"}
        if unknown:
            raise ErftoolError(f"preprocessing has unknown fields {sorted(unknown)}")
        size = d.get("input_size")
        return cls(tuple(int(v) for v in size) if size is not None else None,
                   tuple(float(v) for v in d.get("mean", cls.mean)),
                   tuple(float(v) for v in d.get("std", cls.std)))

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std}

    def __call__(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """(N, C, H, W) or (C, H, W) in [0, 1] -> normalised (and resized to
        input_size when `resize` and a size is set)."""
        single = images.dim() == 3
        x = images[None] if single else images
        x = x.float()
        if resize and self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                              antialias=True)
        c = x.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ErftoolError(f"images have {c} channels but the preprocessing has "
                               f"{len(self.mean)} means / {len(self.std)} stds")
        x = (x - x.new_tensor(self.mean).view(1, -1, 1, 1)) / x.new_tensor(self.std).view(1, -1, 1, 1)
        return x[0] if single else x

