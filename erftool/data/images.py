"""User images (PNG / JPEG) as tensors, and a natural default probe image.

Decoding goes through matplotlib.image (PNG natively, JPEG via Pillow, which
matplotlib depends on), so no extra dependency is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ErftoolError
from .preprocessing import Preprocessing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PathLike = Union[str, Path]


def load_image(path: PathLike) -> torch.Tensor:
    """One image file -> (3, H, W) float32 in [0, 1] (grey is repeated, alpha dropped)."""
    import matplotlib.image as mpimg

    p = Path(path)
    if not p.is_file():
        raise ErftoolError(f"image {str(p)!r} does not exist or is not a file")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ErftoolError(f"{str(p)!r} is not an image erftool reads "
                           f"(supported: {', '.join(IMAGE_SUFFIXES)})")
    try:
        array = np.asarray(mpimg.imread(str(p)))
    except Exception as err:  # Pillow / libpng raise many types for a bad file
        raise ErftoolError(f"cannot decode image {str(p)!r}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ErftoolError(f"image {str(p)!r} has unsupported shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :3])).permute(2, 0, 1).contiguous()


def image_files(folder: PathLike) -> List[Path]:
    """The image files of a folder (sorted), or one file; clear errors otherwise.
    Any other visible file in the folder is an error, so nothing is silently skipped."""
    p = Path(folder)
    if p.is_file():
        load_image(p)  # validates the suffix and that it decodes
        return [p]
    if not p.is_dir():
        raise ErftoolError(f"image folder {str(p)!r} does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            raise ErftoolError(f"{str(f)!r} in the image folder is not a PNG or JPEG file")
    if not files:
        raise ErftoolError(f"image folder {str(p)!r} contains no PNG or JPEG images")
    return files


class ImageFolder(Dataset):
    """The images of a folder, each preprocessed for a model: item i is
    {"image": normalised (3, H, W), "raw": (3, H, W) in [0, 1], "path": str}.
    With a preprocessing that sets input_size every image is resized to it,
    so they batch; otherwise use batch_size=1."""

    def __init__(self, folder: PathLike, preprocessing: Optional[Preprocessing] = None):
        self.files = image_files(folder)
        self.preprocessing = preprocessing or Preprocessing()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        raw = load_image(self.files[index])
        if self.preprocessing.input_size is not None:
            raw = torch.nn.functional.interpolate(
                raw[None], size=self.preprocessing.input_size, mode="bilinear",
                align_corners=False, antialias=True)[0].clamp(0, 1)
        return {"image": self.preprocessing(raw, resize=False), "raw": raw,
                "path": str(self.files[index])}


def sample_image_path() -> Path:
    """matplotlib's bundled photo of Grace Hopper (installed with matplotlib, no download)."""
    import matplotlib.cbook as cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def sample_image() -> torch.Tensor:
    """The default natural probe image, (3, 600, 512) float in [0, 1]."""
    return load_image(sample_image_path())
