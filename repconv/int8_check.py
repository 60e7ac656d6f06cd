"""The INT8 readiness report of a conversion: what symmetric int8 will do to the deploy model.

Three parts, each from what the conversion already holds:

- before the fold, each block rule's own branches (`Rule.branches`, the ones its fuse sums):
  which branch makes the fused kernel's outlier channels (`int8.branch_shares`);
- after it, every conv and linear layer of the deploy model: channel ranges and weight SNR with
  per-tensor and per-channel scales (`int8.weight_facts`);
- a simulated W8A8 pass of the deploy model: weights fake-quantized per output channel,
  every conv and linear layer's input fake-quantized per tensor (unsigned 8 bit, affine) with a
  scale torch's min-max observer calibrated on the calibration inputs. Each fused block is run
  on its own float input (its own SNR: what it adds), and the whole model end to end.

Costs: one float pass over the calibration inputs (calibrating, and recording the blocks'
inputs and outputs for the first `BLOCK_SAMPLES` of them), one run of every block on those,
and one quantized pass: three forward passes per input, all without autograd.
The blocks are ranked worst first, with what to do about those under `INT8_BLOCK_DB`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization.observer import MinMaxObserver

from repconv import int8 as Q
from repconv import kernels as K
from repconv.engine import Applied, Plan
from repconv.errors import NotFusable, RepconvError
from repconv.outputs import flatten_outputs
from repconv.paths import within
from repconv.rules.base import Rule
from repconv.tolerances import INT8_BLOCK_DB, INT8_OUTLIER_RATIO

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# The blocks' own SNR is taken on at most this many calibration inputs (their inputs and
# outputs are held in memory); calibration and the whole-model figure use them all.
BLOCK_SAMPLES = 4
# Activations: unsigned 8 bit, affine, as torch's default static quantization has them.
ACT_DTYPE, ACT_QMIN, ACT_QMAX = torch.quint8, 0, 255
PROXY_NOTE = (
    "calibrated on seeded random inputs: only a proxy for real activations (pass --calib with "
    "real inputs); no accuracy on a dataset is measured"
)

# What to do about a flagged block: a short name (the table's) and what it means (the JSON's).
ADVICE = {
    "quantization-friendly block": "retrain with a quantization-friendly block (QARepVGG-style: "
    "no BN on the 1x1 and identity branches, one BN after the sum)",
    "BN out of the fold for QAT": "for quantization-aware training keep its BN out of the fold "
    "(--deploy-arch with that BN live: the partial fusion)",
    "keep float16": "keep the block in float16 (exclude it from INT8)",
}
ADVICE_QA_BLOCK, ADVICE_KEEP_BN, ADVICE_FLOAT16 = ADVICE


# ---- which branch makes the outliers (before the fold) ----------------------------------


@dataclass(frozen=True)
class Attribution:
    """Which branches make a fused kernel's outlier channels."""

    main: str  # the rule's first branch (the kxk conv's)
    channels: tuple[int, ...]  # the outlier channels, widest first
    shares: tuple[Q.Share, ...]  # largest share first

    @property
    def dominant(self) -> Q.Share:
        return self.shares[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "outlier_channels": list(self.channels[:16]),
            "outlier_count": len(self.channels),
            "branches": [s.to_dict() for s in self.shares],
            "dominant": self.dominant.label(),
        }


def attribute(model: nn.Module, plan: Plan) -> dict[str, Attribution]:
    """Per planned block whose rule names its branches: which of them make the outliers.

    Pure: each block's branches are computed from it as it is (before `engine.apply`), summed
    in float64 as its fuse would. A block whose branches cannot be had is left out (the apply
    says why it is not fused).
    """
    found: dict[str, Attribution] = {}
    with torch.no_grad():
        for step in plan.entries:
            branches_of = step.by.branches if isinstance(step.by, Rule) else None
            if step.refusal is not None or branches_of is None:
                continue
            try:
                parts = branches_of(model.get_submodule(step.path))
                fused = K.add([b for _, b in parts])
            except (NotFusable, ValueError):
                continue
            ranges = Q.channel_ranges(fused.kernel)
            channels = Q.outlier_channels(ranges, INT8_OUTLIER_RATIO)
            shares = Q.branch_shares(parts, channels)
            found[step.path] = Attribution(parts[0][0], tuple(channels), tuple(shares))
    return found


# ---- the simulated W8A8 pass --------------------------------------------------------------


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers int8 runs: every conv and linear layer holding a weight."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, LAYERS) and isinstance(getattr(m, "weight", None), Tensor)
    }


class _Snr:
    """Signal and noise energy summed over samples and output tensors.

    Balanced (a block's figure): per channel (dim 1) of each output tensor, the mean of the
    channels' SNR in dB (`int8.mean_channel_db`), so that every channel counts alike: the
    channels a wide outlier channel's scale crushes then show, though they hold little energy.
    """

    def __init__(self, balanced: bool = False) -> None:
        self.balanced = balanced
        self.signal: dict[str, Tensor | float] = {}
        self.noise: dict[str, Tensor | float] = {}

    def add(self, approx: Any, reference: Any) -> None:
        got, want = flatten_outputs(approx), flatten_outputs(reference)
        for (name, a), (_, r) in zip(got, want):
            ref = r.detach().to(torch.float64)
            err = (a.detach().to(torch.float64) - ref) ** 2
            dims = (
                [d for d in range(ref.dim()) if d != 1] if self.balanced and ref.dim() > 1 else None
            )
            signal = (ref**2).sum(dim=dims) if dims is not None else float((ref**2).sum())
            noise = err.sum(dim=dims) if dims is not None else float(err.sum())
            self.signal[name] = self.signal.get(name, 0.0) + signal
            self.noise[name] = self.noise.get(name, 0.0) + noise

    @property
    def db(self) -> float:
        if self.balanced:
            noise, signal = [], []
            for name, s in self.signal.items():
                signal.append(torch.as_tensor(s, dtype=torch.float64).reshape(-1))
                noise.append(torch.as_tensor(self.noise[name], dtype=torch.float64).reshape(-1))
            if not signal:
                return math.inf
            return Q.mean_channel_db(torch.cat(noise), torch.cat(signal))
        signal, noise = sum(self.signal.values()), sum(self.noise.values())
        if noise == 0.0:
            return math.inf
        if signal == 0.0 or not math.isfinite(noise):
            return -math.inf
        return 10.0 * math.log10(signal / noise)


def output_snr_db(outputs: Sequence[Any], references: Sequence[Any]) -> float:
    """The energy SNR (dB) of outputs against references, over every sample and tensor."""
    snr = _Snr()
    for got, want in zip(outputs, references, strict=True):
        snr.add(got, want)
    return snr.db


def _observer() -> MinMaxObserver:
    return MinMaxObserver(dtype=ACT_DTYPE, qscheme=torch.per_tensor_affine)


def fake_quant_activation(x: Tensor, observer: MinMaxObserver) -> Tensor:
    """`x` fake-quantized per tensor with the scale `observer` calibrated, in x's dtype."""
    scale, zero_point = observer.calculate_qparams()
    q = torch.fake_quantize_per_tensor_affine(
        x.float(), float(scale), int(zero_point), ACT_QMIN, ACT_QMAX
    )
    return q.to(x.dtype)


@dataclass
class _FloatPass:
    observers: dict[str, MinMaxObserver]  # per layer, its input
    outputs: list[Any]
    blocks: dict[str, list[tuple[Tensor, Any]]]
    block_outputs: dict[str, MinMaxObserver]  # per block with a tensor output, that output


def _float_pass(
    model: nn.Module,
    inputs: Sequence[Tensor],
    layers: Mapping[str, nn.Module],
    blocks: Sequence[str],
) -> _FloatPass:
    """Run the float model: calibrate one observer per layer input and per block output, record
    the outputs and the blocks' (input, output) on the first BLOCK_SAMPLES inputs."""
    observers = {p: _observer() for p in layers}
    seen = {p: _observer() for p in blocks}
    recorded: dict[str, list[tuple[Tensor, Any]]] = {p: [] for p in blocks}
    keep = [True]
    handles = []

    def observe(path: str):
        return lambda _m, args: observers[path](args[0].detach().float())

    def record(path: str):
        def hook(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor):
                seen[path](output.detach().float())
            if keep[0] and len(args) == 1 and isinstance(args[0], Tensor):
                recorded[path].append((args[0].detach(), output))

        return hook

    modules = dict(model.named_modules())
    handles += [layers[p].register_forward_pre_hook(observe(p)) for p in layers]
    handles += [modules[p].register_forward_hook(record(p)) for p in blocks]
    outputs = []
    try:
        for i, x in enumerate(inputs):
            keep[0] = i < BLOCK_SAMPLES
            outputs.append(model(x))
    finally:
        for handle in handles:
            handle.remove()
    outs = {p: o for p, o in seen.items() if o.min_val.numel() and math.isfinite(o.min_val)}
    return _FloatPass(observers, outputs, recorded, outs)


@contextmanager
def quantized(
    layers: Mapping[str, nn.Module], observers: Mapping[str, MinMaxObserver]
) -> Iterator[None]:
    """While active: each layer's weight fake-quantized per output channel (symmetric int8) and
    its input fake-quantized per tensor with its observer's scale; all put back after."""
    saved = {}
    handles = []

    def quantize_input(path: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fake_quant_activation(args[0], observers[path]), *args[1:])

        return hook

    try:
        for path, layer in layers.items():
            saved[path] = layer.weight.data
            layer.weight.data = Q.fake_quant_weight(layer.weight)
            handles.append(layer.register_forward_pre_hook(quantize_input(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for path, data in saved.items():
            layers[path].weight.data = data


@dataclass(frozen=True)
class Simulation:
    """The W8A8 figures: each block's own SNR (dB) and the whole model's."""

    blocks: dict[str, float]
    model: float
    samples: int


def simulate(
    model: nn.Module,
    inputs: Sequence[Tensor],
    blocks: Sequence[str],
    *,
    quantize_outputs: bool = True,
) -> Simulation:
    """Simulated W8A8 of `model` on `inputs`: end to end, and per block: the block run on
    its float input, its output fake-quantized per tensor as the next layer will read it
    (unless not `quantize_outputs`: then a layer's figure is what quantizing its own weights
    and input costs, what keeping that one node in float saves)."""
    modules = dict(model.named_modules())
    blocks = [p for p in blocks if p in modules]
    layers = quantized_layers(model)
    model.eval()
    with torch.no_grad():
        floats = _float_pass(model, inputs, layers, blocks)
        whole, per_block = _Snr(), {p: _Snr(balanced=True) for p in blocks}
        with quantized(layers, floats.observers):
            for path, pairs in floats.blocks.items():
                stored = floats.block_outputs.get(path) if quantize_outputs else None
                for x, y in pairs:
                    got = modules[path](x)
                    if stored is not None:  # the next layer reads it in int8
                        got = fake_quant_activation(got, stored)
                    per_block[path].add(got, y)
            for x, y in zip(inputs, floats.outputs):
                whole.add(model(x), y)
    return Simulation({p: s.db for p, s in per_block.items()}, whole.db, len(inputs))


# ---- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockFigure:
    path: str
    family: str
    snr_db: float  # simulated W8A8, the block on its own float input
    weights: dict[str, Q.WeightFacts]  # its layers
    attribution: Attribution | None
    advice: str | None  # None: not flagged

    @property
    def worst_layer(self) -> tuple[str, Q.WeightFacts] | None:
        if not self.weights:
            return None
        return min(self.weights.items(), key=lambda kv: kv[1].snr_per_tensor)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "family": self.family,
            "w8a8_snr_db": Q.finite_or_none(self.snr_db),
            "flagged": self.advice is not None,
            "advice": self.advice,
            "advice_text": None if self.advice is None else ADVICE[self.advice],
            "layers": {p: f.to_dict() for p, f in self.weights.items()},
            "outliers": None if self.attribution is None else self.attribution.to_dict(),
        }


@dataclass(frozen=True)
class Int8Report:
    calibration: str  # where the calibration inputs came from
    proxy: bool  # seeded random inputs, not real ones
    samples: int
    model_snr_db: float
    blocks: list[BlockFigure]  # worst first
    layers: dict[str, Q.WeightFacts] = field(default_factory=dict)  # every quantized layer
    order: list[str] = field(default_factory=list)  # the blocks' paths in model order

    @property
    def worst_block_db(self) -> float:
        return min((b.snr_db for b in self.blocks), default=math.inf)

    @property
    def flagged(self) -> list[BlockFigure]:
        return [b for b in self.blocks if b.advice is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "samples": self.samples,
            "note": PROXY_NOTE if self.proxy else "no accuracy on a dataset is measured",
            "scheme": {
                "weights": "symmetric int8, per output channel (torch PerChannelMinMaxObserver)",
                "activations": "uint8 affine per tensor at every conv/linear input "
                "(torch MinMaxObserver)",
                "flag_below_db": INT8_BLOCK_DB,
                "outlier_ratio": INT8_OUTLIER_RATIO,
            },
            "model_w8a8_snr_db": Q.finite_or_none(self.model_snr_db),
            "worst_block_snr_db": Q.finite_or_none(self.worst_block_db),
            "blocks": [b.to_dict() for b in self.blocks],
            "block_order": self.order or [b.path for b in self.blocks],
            "layers": {p: f.to_dict() for p, f in self.layers.items()},
        }


def advice_for(snr_db: float, attribution: Attribution | None) -> str | None:
    """What to do about a block (None: nothing, its W8A8 output is good enough).

    A norm on a side branch (the identity's or the 1x1's gamma/sigma) making the outliers is
    the RepVGG collapse: the block itself is the problem. The main branch's norm: its BN can be
    kept out of the fold for quantization-aware training. Anything else (activation ranges, a
    block with no branches to blame): keep the block in float16.
    """
    if snr_db >= INT8_BLOCK_DB:
        return None
    if attribution is not None and attribution.dominant.scale is not None:
        if attribution.dominant.name != attribution.main:
            return ADVICE_QA_BLOCK
        return ADVICE_KEEP_BN
    return ADVICE_FLOAT16


def report(
    model: nn.Module,
    applied: Applied,
    attributions: Mapping[str, Attribution],
    inputs: Sequence[Tensor],
    calibration: str,
    proxy: bool,
) -> Int8Report:
    """The INT8 readiness report of the deploy `model` a conversion (`applied`) produced."""
    fused = [o for o in applied.entries if o.status == "fused"]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    fed = [x.to(dtype) for x in inputs]
    try:
        simulation = simulate(model, fed, [o.path for o in fused])
    except RuntimeError as exc:
        raise RepconvError(f"the simulated W8A8 pass failed: {exc}") from exc
    layers = {p: Q.weight_facts(m.weight) for p, m in quantized_layers(model).items()}
    blocks = []
    for outcome in fused:
        if outcome.path not in simulation.blocks:
            continue  # not in the deploy model under this path (a deploy model of the user's)
        snr = simulation.blocks[outcome.path]
        attribution = attributions.get(outcome.path)
        mine = {p: f for p, f in layers.items() if within(p, outcome.path)}
        blocks.append(
            BlockFigure(
                outcome.path, outcome.family, snr, mine, attribution, advice_for(snr, attribution)
            )
        )
    order = [b.path for b in blocks]
    blocks.sort(key=lambda b: b.snr_db)
    return Int8Report(
        calibration, proxy, simulation.samples, simulation.model, blocks, layers, order
    )
