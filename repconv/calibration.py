"""Calibration inputs for the INT8 report (`--calib PATH`): tensors, or images with Pillow.

PATH is one file or a folder of files (read in name order, not recursively): `.pt`/`.pth`
(torch.load with weights_only=True: a tensor, or a list/tuple/dict of them) and `.npy`
(numpy.load with allow_pickle=False) hold C,H,W or N,C,H,W arrays; `.png`/`.jpg`/`.jpeg`/
`.bmp` images are read with Pillow (an optional extra) as RGB in [0, 1], normalised with the
ImageNet mean and std, and resized to the input shape. Nothing read here runs code. Every
mistake (unreadable file, wrong shape, NaN or Inf, nothing found) is BadInput naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from repconv.errors import BadInput
from repconv.terminal import shown

TENSOR_SUFFIXES = (".pt", ".pth", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A calibration set larger than this is refused: the report holds no more (about a minute of
# simulation on a small net), and real calibrations use a few hundred at most.
MAX_INPUTS = 1024


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(
            p for p in path.iterdir() if p.suffix.lower() in TENSOR_SUFFIXES + IMAGE_SUFFIXES
        )
        if not found:
            raise BadInput(f"--calib {shown(str(path))}: no .pt, .npy or image files in it")
        return found
    if not path.exists():
        raise BadInput(f"--calib {shown(str(path))}: no such file or folder")
    if path.suffix.lower() not in TENSOR_SUFFIXES + IMAGE_SUFFIXES:
        raise BadInput(f"--calib {shown(str(path))}: expected .pt, .npy or an image")
    return [path]


def _tensors_in(path: Path) -> list[Tensor]:
    """The arrays a tensor file holds, as float32 tensors (not yet shape-checked)."""
    try:
        if path.suffix.lower() == ".npy":
            import numpy

            value = torch.from_numpy(numpy.load(path, allow_pickle=False).copy())
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader's failure is the file's
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"--calib {shown(path.name)}: cannot be read: {shown(reason)}") from None
    values = list(value.values()) if isinstance(value, dict) else value
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values or not all(isinstance(v, Tensor) for v in values):
        raise BadInput(f"--calib {shown(path.name)}: holds no tensor (or something else too)")
    return [v.float() for v in values]


def _image(path: Path) -> Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise BadInput(
            f"--calib {shown(path.name)}: reading images needs Pillow (pip install "
            "'repconv[images]'); or pass .pt/.npy tensors"
        ) from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            pixels = data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255.0
    except Exception as exc:
        raise BadInput(
            f"--calib {shown(path.name)}: not a readable image: {shown(str(exc))}"
        ) from None
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def _samples(tensor: Tensor, shape: Sequence[int], name: str) -> list[Tensor]:
    """Batch-1 samples of `shape` from a C,H,W or N,C,H,W tensor."""
    want = tuple(shape)
    batch = tensor.unsqueeze(0) if tensor.dim() == len(want) else tensor
    if tuple(batch.shape[1:]) != want or batch.dim() != len(want) + 1:
        raise BadInput(
            f"--calib {shown(name)}: a tensor of shape {list(tensor.shape)}, expected "
            f"{list(want)} or N,{','.join(map(str, want))}"
        )
    if not bool(torch.isfinite(batch).all()):
        raise BadInput(f"--calib {shown(name)}: holds NaN or Inf")
    return [batch[i : i + 1].contiguous() for i in range(batch.shape[0])]


def _resized(image: Tensor, shape: Sequence[int], name: str) -> Tensor:
    if len(shape) != 3 or shape[0] != 3:
        raise BadInput(f"--calib {shown(name)}: an RGB image, but the input shape is {list(shape)}")
    return torch.nn.functional.interpolate(
        image, size=tuple(shape[1:]), mode="bilinear", align_corners=False, antialias=True
    )


def load(path: str | Path, shape: Sequence[int]) -> list[Tensor]:
    """The calibration inputs at `path` as batch-1 float32 tensors of `shape`."""
    inputs: list[Tensor] = []
    for file in _files(Path(path)):
        if file.suffix.lower() in IMAGE_SUFFIXES:
            inputs.append(_resized(_image(file), shape, file.name))
        else:
            for tensor in _tensors_in(file):
                inputs += _samples(tensor, shape, file.name)
        if len(inputs) > MAX_INPUTS:
            raise BadInput(f"--calib {shown(str(path))}: more than {MAX_INPUTS} inputs")
    return inputs


@dataclass(frozen=True)
class Calibration:
    """Where an INT8 report's calibration inputs come from: `path`, or (None) the
    verification's seeded random inputs."""

    path: Path | None = None

    @property
    def source(self) -> str:
        return "the verification's seeded random inputs" if self.path is None else str(self.path)

    def check(self) -> None:
        """Refuse a path that holds nothing to read, before any work is done."""
        if self.path is not None:
            _files(self.path)

    def load(self, shape: Sequence[int]) -> list[Tensor] | None:
        """The inputs, shaped `shape` (None: use the verification's)."""
        return None if self.path is None else load(self.path, shape)
