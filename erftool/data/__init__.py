"""Data: the synthetic deformation dataset, user image folders, preprocessing.

- `SyntheticDeformations` + `make_loader`: procedural objects under known scale,
  rotation, stretch and elastic warp on cluttered backgrounds (seeded).
- `normalize`: the synthetic-data models' input normalisation.
- `ImageFolder`, `load_image`, `image_files`: PNG / JPEG files.
- `sample_image()`: a natural photo shipped with matplotlib, the default probe.
- `Preprocessing`: input size + mean / std, as stored in checkpoints.
"""
from .images import IMAGE_SUFFIXES, ImageFolder, image_files, load_image, sample_image, sample_image_path
from .preprocessing import Preprocessing
from .render import CLASSES
from .synthetic import (
    SYNTHETIC_MEAN, SYNTHETIC_STD, SyntheticDeformations, make_loader, normalize,
)

normalise = normalize

__all__ = [
    "SyntheticDeformations", "make_loader", "normalize", "normalise", "CLASSES",
    "SYNTHETIC_MEAN", "SYNTHETIC_STD", "ImageFolder", "load_image", "image_files",
    "sample_image", "sample_image_path", "IMAGE_SUFFIXES", "Preprocessing",
]
