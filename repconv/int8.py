"""INT8 arithmetic on weights and branches: pure functions, tensors in, numbers out (float64).

What a fused kernel looks like to symmetric int8 quantization: each output channel's range
(max |w|), the widest channel against the median one, the signal-to-quantization-noise ratio
(every channel counting alike) with one scale for the whole tensor and with one scale per
output channel, and, given the
branches the kernel was summed from, which branch makes its largest weights. The scales come
from torch's own observers and the rounding from torch's fake-quantize ops, so the figures are
the ones a torch (or TensorRT-style symmetric) quantizer would see; nothing here rounds by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from repconv.kernels import MATH_DTYPE, Branch, add, pad_to

# Signed int8 as torch's observers use it for weights (symmetric: zero point 0).
QMIN, QMAX = -128, 127


def channel_ranges(weight: Tensor) -> Tensor:
    """max |w| of each output channel (dim 0), in float64."""
    flat = weight.detach().to(MATH_DTYPE).reshape(weight.shape[0], -1)
    return flat.abs().amax(dim=1)


def range_ratio(ranges: Tensor) -> float:
    """The widest channel's range over the median channel's (inf when the median is 0)."""
    widest = float(ranges.max())
    median = float(ranges.median())
    if median == 0.0:
        return math.inf if widest > 0 else 1.0
    return widest / median


def snr_db(reference: Tensor, approx: Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), in float64 (inf when they are equal)."""
    ref = reference.detach().to(MATH_DTYPE)
    noise = float(((approx.detach().to(MATH_DTYPE) - ref) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# A channel's noise-to-signal ratio is taken as at least this (120 dB): an exact channel would
# make the mean infinite.
RATIO_FLOOR = 1e-12


def mean_channel_db(noise: Tensor, signal: Tensor) -> float:
    """The mean over channels of each channel's SNR in dB (-10 log10 noise / signal), channels
    with no signal (a dead ReLU's) left out; inf if none is left.

    Every channel counts alike, and a nearly dead channel moves the mean by its share only (a
    mean of the ratios themselves would be that channel's alone)."""
    live = signal > 0
    if not bool(live.any()):
        return math.inf
    ratio = (noise[live] / signal[live]).clamp(min=RATIO_FLOOR)
    return float((-10.0 * torch.log10(ratio)).mean())


def balanced_snr_db(reference: Tensor, approx: Tensor) -> float:
    """The SNR with every output channel (dim 0) counting alike (`mean_channel_db`). An energy
    SNR hides what a wide channel's scale does to the narrow ones, which hold little energy;
    this one shows it."""
    ref = reference.detach().to(MATH_DTYPE).reshape(reference.shape[0], -1)
    noise = ((approx.detach().to(MATH_DTYPE).reshape(ref.shape) - ref) ** 2).sum(dim=1)
    return mean_channel_db(noise, (ref**2).sum(dim=1))


def weight_qparams(weight: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Symmetric int8 (scale, zero point) of `weight` from torch's min-max observers."""
    w = weight.detach().float()
    if per_channel:
        observer = PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
    else:
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    return scale.float(), zero_point.int()


def fake_quant_weight(weight: Tensor, per_channel: bool = True) -> Tensor:
    """`weight` rounded to symmetric int8 and back (torch's fake-quantize ops), in its dtype."""
    w = weight.detach().float()
    scale, zero_point = weight_qparams(w, per_channel)
    if per_channel:
        q = torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, QMIN, QMAX)
    else:
        q = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zero_point), QMIN, QMAX)
    return q.to(weight.dtype)


@dataclass(frozen=True)
class WeightFacts:
    """One weight tensor as int8 sees it."""

    shape: tuple[int, ...]
    widest: float  # the widest channel's range
    median: float  # the median channel's range
    ratio: float  # widest / median
    widest_channel: int
    snr_per_tensor: float  # dB, channel-balanced (`balanced_snr_db`)
    snr_per_channel: float  # dB, likewise

    def to_dict(self) -> dict[str, object]:
        return {
            "shape": list(self.shape),
            "widest_range": self.widest,
            "median_range": self.median,
            "range_ratio": finite_or_none(self.ratio),
            "widest_channel": self.widest_channel,
            "snr_per_tensor_db": finite_or_none(self.snr_per_tensor),
            "snr_per_channel_db": finite_or_none(self.snr_per_channel),
        }


def finite_or_none(value: float) -> float | None:
    """JSON has no inf or NaN: None stands for them."""
    return value if math.isfinite(value) else None


def weight_facts(weight: Tensor) -> WeightFacts:
    ranges = channel_ranges(weight)
    return WeightFacts(
        shape=tuple(weight.shape),
        widest=float(ranges.max()),
        median=float(ranges.median()),
        ratio=range_ratio(ranges),
        widest_channel=int(ranges.argmax()),
        snr_per_tensor=balanced_snr_db(weight, fake_quant_weight(weight, per_channel=False)),
        snr_per_channel=balanced_snr_db(weight, fake_quant_weight(weight, per_channel=True)),
    )


def outlier_channels(ranges: Tensor, factor: float) -> list[int]:
    """The channels wider than `factor` times the median, widest first; the widest alone when
    none is."""
    median = float(ranges.median())
    wide = [int(c) for c in torch.argsort(ranges, descending=True) if ranges[c] > factor * median]
    return wide or [int(ranges.argmax())]


@dataclass(frozen=True)
class Share:
    """A branch's part in the largest fused weights of the outlier channels."""

    name: str
    share: float  # of the summed |contribution| at those weights, 0..1
    scale: float | None  # its largest per-channel scale there (a folded norm's gamma/sigma)

    def label(self) -> str:
        if self.scale is None:
            return self.name
        return f"{self.name} (BN gamma/sigma {self.scale:.3g})"

    def to_dict(self) -> dict[str, object]:
        return {"branch": self.name, "share": self.share, "norm_scale": self.scale}


def branch_shares(parts: Sequence[tuple[str, Branch]], channels: Sequence[int]) -> list[Share]:
    """Each branch's share of the fused kernel's largest weight in each of `channels`.

    The branches are centred in the largest kernel as `kernels.add` sums them; at the position
    of each channel's largest |fused weight|, branch b contributes v_b; its share is
    sum |v_b| / sum over branches of sum |v_b|. Largest share first.
    """
    rows = list(channels)
    picked = [_rows(branch, rows) for _, branch in parts]
    size = tuple(max(p.kernel.shape[d] for p in picked) for d in range(2, picked[0].kernel.dim()))
    scaled = [pad_to(p, size).scaled_kernel().reshape(len(rows), -1) for p in picked]
    fused = add(picked, size=None).kernel.reshape(len(rows), -1)
    where = fused.abs().argmax(dim=1, keepdim=True)
    values = torch.stack([s.gather(1, where).squeeze(1).abs() for s in scaled])
    total = float(values.sum())
    shares = []
    for (name, branch), row_values in zip(parts, values):
        scale = None
        if branch.scale is not None:
            scale = float(branch.scale.detach().to(MATH_DTYPE)[rows].abs().max())
        share = float(row_values.sum()) / total if total > 0 else 0.0
        shares.append(Share(name, share, scale))
    return sorted(shares, key=lambda s: -s.share)


def _rows(branch: Branch, rows: list[int]) -> Branch:
    index = torch.tensor(rows, dtype=torch.long, device=branch.kernel.device)
    scale = None if branch.scale is None else branch.scale.index_select(0, index)
    return Branch(branch.kernel.index_select(0, index), branch.bias.index_select(0, index), scale)
