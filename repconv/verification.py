"""Verification: does the deploy model compute what the train model computed?

Verification owns everything that judges a conversion: the reference pass over the train model,
the per-block probes run while the engine fuses (`BlockProbes`), the error figures, and the blocks
suspected when a figure fails.

Outputs are compared per tensor as max|deploy - ref| / max|ref|. Two figures, both by default
with activations in float64 so that rounding in the passes neither hides a bug nor fails a correct
conversion: `exact` runs the fused weights before they are rounded (it judges the math alone) and
`written` runs them exactly as they will be written (it judges the file).

`repconv verify` adds a check of the file itself: conversion is deterministic, so the deploy
tensors recomputed from the train checkpoint must equal the file's, element by element, to within
one unit in the last place of the file's dtype (a `TensorCheck`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from repconv.arch import rejected_input
from repconv.errors import BadInput, is_out_of_memory
from repconv.modules import default_dtype
from repconv.outputs import Figure, compare_outputs, measure, worst
from repconv.tolerances import written_limit

if TYPE_CHECKING:
    from repconv.engine import Outcome, Step

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# Recomputed tensors are rounded once from float64, like the converter's; only the order of
# float64 sums may differ (GEMM blocking follows the thread count), which moves at most one ulp.
ULP_LIMIT = 1
MAX_SHOWN = 5
_BITS_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def written_tolerances(
    dtypes: set[torch.dtype], atol: float | None, rtol: float | None
) -> dict[str, float]:
    """The written figure's limits: the user's, or the default of the least precise dtype."""
    default = max((written_limit(d) for d in dtypes), default=written_limit(torch.float32))
    if atol is None and rtol is None:
        return {"written_atol": 0.0, "written_rtol": default}
    return {"written_atol": atol or 0.0, "written_rtol": rtol or 0.0}


# Where free memory cannot be read (off Linux): more than any sane verification input needs.
FALLBACK_MEMORY = 16 << 30


# How torch and the C library word a failed allocation.
def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _data_in_use() -> int | None:
    """VmData: the memory RLIMIT_DATA counts, in use by this process now (Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, ValueError, StopIteration):
        return None


def _data_limit_headroom() -> int | None:
    """What RLIMIT_DATA (batch's memory_limit) still allows this process, if it is set."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - (_data_in_use() or 0), 0)


def available_memory() -> int:
    """Bytes this process can still allocate, about: MemAvailable, within RLIMIT_DATA."""
    found = [v for v in (_meminfo_bytes("MemAvailable"), _data_limit_headroom()) if v is not None]
    return min(found) if found else FALLBACK_MEMORY


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_inputs_fit(shape: Sequence[int], count: int, dtype: torch.dtype) -> None:
    """Refuse inputs that alone exceed the memory left, before allocating them.

    The activations inside the model are larger still; this catches a mistyped shape with a
    clear message instead of an allocator error or the kernel's OOM killer.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = count * math.prod(shape) * itemsize
    available = available_memory()
    if needed > available:
        raise BadInput(
            f"not enough memory for inputs of shape {list(shape)}: {count} x "
            f"{str(dtype).removeprefix('torch.')} need {needed} bytes ({_gigabytes(needed)}), "
            f"{_gigabytes(available)} available; use a smaller --input-shape"
        )


@contextmanager
def _allocations_capped() -> Iterator[None]:
    """Make allocations beyond the memory available fail, while active (Linux).

    A failed allocation is an error we can report; memory promised but not there wakes the
    kernel's OOM killer instead. Only the soft RLIMIT_DATA is lowered, and restored after.
    """
    in_use, free = _data_in_use(), _meminfo_bytes("MemAvailable")
    if resource is None or in_use is None or free is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = in_use + free
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@contextmanager
def reporting_out_of_memory(shape: Sequence[int]) -> Iterator[None]:
    """Turn a failed allocation while running the model into one line naming the shape."""
    try:
        with _allocations_capped():
            yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise BadInput(
            f"not enough memory to run the model on inputs of shape {list(shape)}: it ran out "
            "of memory; use a smaller --input-shape"
        ) from None


def make_inputs(shape: Sequence[int], samples: int, seed: int, dtype: torch.dtype) -> list[Tensor]:
    """`samples` seeded standard-normal inputs of batch 1 (the same for every run)."""
    check_inputs_fit(shape, samples, dtype)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((1, *shape), generator=generator, dtype=dtype) for _ in range(samples)]


@contextmanager
def recording_input_shapes(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, list]]:
    """While active, records the input shape of each listed module the first time it runs."""
    shapes: dict[str, list] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if path not in shapes and len(args) == 1 and isinstance(args[0], Tensor):
                shapes[path] = list(args[0].shape)

        return hook

    modules = dict(model.named_modules())
    for path in paths:
        if path in modules:
            handles.append(modules[path].register_forward_pre_hook(hook_for(path)))
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


def run_model(model: nn.Module, inputs: Sequence[Tensor]) -> list[Any]:
    """The model's output on each input, without autograd, with torch's default dtype that of
    the inputs (a forward building a tensor without a dtype builds it in theirs)."""
    with torch.no_grad(), default_dtype(inputs[0].dtype if inputs else None):
        return [model(x) for x in inputs]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def reference_outputs(
    model: nn.Module, inputs: Sequence[Tensor], shape: Sequence[int], shape_given: bool = True
) -> list:
    """The train model's outputs; a model that cannot run on `shape` is the user's input error.

    The message names the shape the model's first layer expects, and suggests --input-shape
    only when the user did not set it (`shape_given`).
    """
    try:
        with reporting_out_of_memory(shape):
            return run_model(model, inputs)
    except RuntimeError as exc:
        fed = list(inputs[0].shape) if inputs else [1, *shape]
        raise BadInput(rejected_input(model, fed, _first_line(exc), shape_given)) from None


# ---- the reference pass and the per-block probes ------------------------------------------


@dataclass
class Reference:
    """The train model's outputs on the verification inputs, taken before anything is fused.

    `shape` is what the inputs have; `full_shape` the input shape asked for (the same, unless
    the figures are taken at a reduced size: see `take_reference`)."""

    shape: list[int]
    samples: int
    seed: int
    dtype: torch.dtype
    inputs: list[Tensor]
    outputs: list[Any]
    block_shapes: dict[str, list] = field(default_factory=dict)
    full_shape: list[int] | None = None

    def __post_init__(self) -> None:
        self.full_shape = list(self.full_shape or self.shape)

    @property
    def reduced(self) -> bool:
        return self.shape != self.full_shape

    def figures(self, model: nn.Module) -> dict[str, Figure]:
        """How far the model's outputs now are from the reference ones."""
        return measure(run_model(model, self.inputs), self.outputs)

    def block_probes(self) -> BlockProbes:
        """Probes for the engine, shaped by what each block saw on the reference pass."""
        return BlockProbes(self.block_shapes, seed=self.seed)


# A wrong fold shows at any input size at which every fused block still sees its kernel whole,
# and the float64 passes cost what the input's area does. So the default input (never one the
# user set) is tried first at a quarter, then at half its side; the first the model runs on and
# at which every block sees enough (`sees_enough`) is kept, the full size otherwise.
REDUCTIONS = (4, 2)
MIN_REDUCED_SIDE = 32


def take_reference(
    model: nn.Module,
    shape: Sequence[int],
    samples: int,
    seed: int,
    dtype: torch.dtype,
    blocks: Mapping[str, tuple[int, ...] | None] | None = None,
    shape_given: bool = True,
) -> Reference:
    """Run the train model once on seeded inputs, recording what each block in `blocks` (the
    planned blocks' paths, each with its kernel extent, `modules.kernel_extent`) is fed; at a
    reduced size when the shape was not given and the blocks allow it."""
    blocks = blocks or {}
    for factor in () if shape_given else REDUCTIONS:
        smaller = reduced_shape(shape, factor)
        if smaller is None:
            continue
        try:
            reference = _reference_at(model, smaller, samples, seed, dtype, blocks)
        except Exception:  # the model does not take this size: the full one decides
            break
        if sees_enough(reference.block_shapes, blocks, factor):
            reference.full_shape = list(shape)
            return reference
    return _reference_at(model, shape, samples, seed, dtype, blocks, shape_given)


def _reference_at(
    model: nn.Module,
    shape: Sequence[int],
    samples: int,
    seed: int,
    dtype: torch.dtype,
    blocks: Mapping[str, Any],
    shape_given: bool = True,
) -> Reference:
    inputs = make_inputs(shape, samples, seed, dtype)
    with recording_input_shapes(model, list(blocks)) as block_shapes:
        outputs = reference_outputs(model, inputs, shape, shape_given)
    return Reference(list(shape), samples, seed, dtype, inputs, outputs, block_shapes)


def reduced_shape(shape: Sequence[int], factor: int) -> list[int] | None:
    """An image shape (C, H, W) with its sides divided by `factor`, if they stay at least
    MIN_REDUCED_SIDE; None for other shapes (sequences, volumes) or sides that small."""
    if len(shape) != 3 or min(shape[1:]) // factor < MIN_REDUCED_SIDE:
        return None
    return [shape[0], *(side // factor for side in shape[1:])]


def sees_enough(
    seen: Mapping[str, Sequence[int]], blocks: Mapping[str, tuple[int, ...] | None], factor: int
) -> bool:
    """Whether every block with a conv ran on an input of at least half its kernel's extent
    per side (every tap then reads the image somewhere), or on as much as it sees at the full
    size (about `factor` times this one) when that is less."""
    for path, extent in blocks.items():
        if extent is None:
            continue
        if path not in seen or len(seen[path]) != len(extent) + 2:
            return False  # not run at this size (or not on an image): the full size decides
        for side, width in zip(seen[path][2:], extent):
            if side < min(width // 2 + 1, side * factor):
                return False
    return True


PROBE_SIDE = 32


def probe_shape(seen: Sequence[int] | None) -> tuple[int, ...] | None:
    """The shape a block is probed with: what it saw, one sample, at most 32x32 in space.

    A wrong fold shows at any size larger than the kernel (borders included), and the full-size
    probes of every block would cost about as much as the verification passes themselves.
    """
    if seen is None:
        return None
    shape = list(seen)
    if shape:
        shape[0] = 1
    if len(shape) == 4:
        shape[2:] = [min(side, PROBE_SIDE) for side in shape[2:]]
    return tuple(shape)


def run_chain(model: nn.Module, paths: Sequence[str], x: Tensor) -> Any:
    """Run the modules at `paths` one after the other (a step's modules, in data-flow order),
    torch's default dtype that of `x`."""
    with default_dtype(x.dtype):
        for path in paths:
            x = model.get_submodule(path)(x)
    return x


class BlockProbes:
    """The engine's per-block observer: each block's own error, so a failure can name blocks.

    Called with a step before it is fused, it runs the step's modules on one seeded random
    input (shaped like what the block saw, see `probe_shape`) and returns a function that runs
    them again after fusing and gives the block's relative error. Blocks never seen on the
    reference pass are not probed.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], seed: int = 0):
        self.shapes = shapes
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, step: Step) -> Callable[[], float] | None:
        shape = probe_shape(self.shapes.get(step.path))
        if shape is None:
            return None
        dtype = next(model.get_submodule(step.path).parameters()).dtype
        probe = torch.randn(shape, generator=self.generator, dtype=dtype)
        with torch.no_grad():
            before = run_chain(model, step.chain, probe)

        def block_error() -> float:
            with torch.no_grad():
                after = run_chain(model, step.chain, probe)
            return max(compare_outputs(after, before).values(), default=0.0)

        return block_error


def suspects(outcomes: Sequence[Outcome], limit: float) -> list[dict[str, Any]]:
    """The blocks whose own error exceeds `limit`, worst first."""
    return [
        {"path": o.path, "rule": o.rule, "block_error": o.block_error}
        for o in sorted(outcomes, key=lambda o: -(o.block_error or 0.0))
        if o.block_error is not None and not o.block_error <= limit
    ]


def _ordered_bits(t: Tensor) -> Tensor:
    """Each float's bit pattern as an int64 that orders like the floats (-0 and +0 both 0)."""
    bits = _BITS_OF[t.dtype]
    raw = t.contiguous().view(bits).to(torch.int64)
    # Floats are sign-magnitude: a negative float's magnitude bits count away from zero.
    return torch.where(raw < 0, torch.iinfo(bits).min - raw, raw)


def ulp_distance(actual: Tensor, expected: Tensor) -> Tensor:
    """Per element, how many steps through the values of their (common) dtype apart they are."""
    a, b = _ordered_bits(actual), _ordered_bits(expected)
    same_side = (a >= 0) == (b >= 0)
    # Across zero the difference could overflow int64; its size is all that matters there.
    across = a.abs().to(torch.float64) + b.abs().to(torch.float64)
    return torch.where(same_side, (a - b).abs().to(torch.float64), across)


@dataclass
class TensorDifference:
    """A deploy tensor that is not what the train checkpoint converts to."""

    key: str
    ulps: float
    max_abs: float
    problem: str | None = None  # why the values could not be compared, if they could not

    def describe(self) -> str:
        if self.problem:
            return f"{self.key} ({self.problem})"
        return f"{self.key} ({self.ulps:.3g} ulp, {self.max_abs:.3g} absolute)"


@dataclass
class TensorCheck:
    """The deploy file's tensors against the ones recomputed from the train checkpoint."""

    compared: int = 0
    bit_exact: int = 0
    within_ulp: int = 0
    differing: int = 0
    misfits: int = 0  # of the differing, how many have another shape or kind of dtype
    first_differences: list[TensorDifference] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # recomputed, absent from the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not recomputed

    @property
    def fits(self) -> bool:
        """The file's keys and shapes fit the model (so it can be loaded and run)."""
        return not self.missing and not self.unexpected and not self.misfits

    @property
    def passed(self) -> bool:
        return self.differing == 0 and not self.missing and not self.unexpected

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compared": self.compared,
            "bit_exact": self.bit_exact,
            "within_ulp": self.within_ulp,
            "differing": self.differing,
            "ulp_limit": ULP_LIMIT,
            "first_differences": [
                {
                    "key": d.key,
                    "ulps": _finite_or_none(d.ulps),
                    "max_abs": _finite_or_none(d.max_abs),
                    "problem": d.problem,
                }
                for d in self.first_differences
            ],
            "missing": self.missing,
            "unexpected": self.unexpected,
        }

    def summary(self) -> str:
        equal = self.bit_exact + self.within_ulp
        text = (
            f"{equal} of {self.compared} equal to the recomputed ones "
            f"({self.bit_exact} bit-exact, {self.within_ulp} within {ULP_LIMIT} ulp)"
        )
        return text + "".join(f"; {part}" for part in self.problems())

    def problems(self) -> list[str]:
        parts = []
        if self.differing:
            named = ", ".join(d.describe() for d in self.first_differences)
            more = ", ..." if self.differing > len(self.first_differences) else ""
            parts.append(f"{self.differing} differ: {named}{more}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the file: {_few(self.missing)}")
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} not in the recomputed model: {_few(self.unexpected)}"
            )
        return parts


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity


def _few(keys: Sequence[str]) -> str:
    return ", ".join(keys[:MAX_SHOWN]) + (", ..." if len(keys) > MAX_SHOWN else "")


def compare_tensors(recomputed: Mapping[str, Tensor], written: Mapping[str, Tensor]) -> TensorCheck:
    """Round each recomputed tensor to the dtype the file holds it in and compare the two."""
    check = TensorCheck(
        missing=[k for k in recomputed if k not in written],
        unexpected=[k for k in written if k not in recomputed],
    )
    for key, expected in recomputed.items():
        if key not in written:
            continue
        check.compared += 1
        outcome, difference = _compare_one(key, expected.detach(), written[key].detach())
        if outcome == "bit-exact":
            check.bit_exact += 1
        elif outcome == "within":
            check.within_ulp += 1
        else:
            check.differing += 1
            check.misfits += outcome == "misfit"
            if len(check.first_differences) < MAX_SHOWN:
                check.first_differences.append(difference)
    return check


def _compare_one(key: str, expected: Tensor, actual: Tensor) -> tuple[str, TensorDifference | None]:
    """("bit-exact" | "within" | "differs" | "misfit", the difference when there is one)."""
    if expected.shape != actual.shape:
        shapes = f"{tuple(actual.shape)} in the file, {tuple(expected.shape)} recomputed"
        return "misfit", TensorDifference(key, float("inf"), float("inf"), f"shape {shapes}")
    if expected.is_floating_point() != actual.is_floating_point():
        dtypes = f"{actual.dtype} in the file, {expected.dtype} recomputed"
        return "misfit", TensorDifference(key, float("inf"), float("inf"), f"dtype {dtypes}")
    rounded = expected.to(actual.dtype)
    if actual.dtype in _BITS_OF:
        bits = _BITS_OF[actual.dtype]
        if torch.equal(rounded.contiguous().view(bits), actual.contiguous().view(bits)):
            return "bit-exact", None
        ulps = ulp_distance(actual, rounded)
    else:
        if torch.equal(rounded, actual):
            return "bit-exact", None
        # Integers (counters) are copied, never rounded: any change is a difference.
        ulps = torch.full(actual.shape, float("inf"))
    worst_ulps = float(ulps.max()) if ulps.numel() else 0.0
    if worst_ulps <= ULP_LIMIT:
        return "within", None
    diff = (actual.to(torch.float64) - rounded.to(torch.float64)).abs()
    max_abs = float(diff.nan_to_num(float("inf")).max()) if diff.numel() else 0.0
    return "differs", TensorDifference(key, worst_ulps, max_abs)


@dataclass
class Verification:
    """The outcome of comparing a deploy model against its train model."""

    input_shape: list[int]
    samples: int
    seed: int
    dtype: str
    exact: dict[str, Figure] | None
    written: dict[str, Figure] | None  # None: the file could not be run (its keys do not fit)
    exact_limit: float
    written_atol: float
    written_rtol: float
    suspects: list[dict[str, Any]] = field(default_factory=list)
    tensors: TensorCheck | None = None  # `repconv verify` only

    @property
    def exact_passed(self) -> bool:
        return self.exact is None or all(
            f.passes(0.0, self.exact_limit) for f in self.exact.values()
        )

    @property
    def written_passed(self) -> bool:
        if self.written is None:
            return False
        return all(f.passes(self.written_atol, self.written_rtol) for f in self.written.values())

    @property
    def tensors_passed(self) -> bool:
        return self.tensors is None or self.tensors.passed

    @property
    def passed(self) -> bool:
        return self.exact_passed and self.written_passed and self.tensors_passed

    def to_dict(self) -> dict[str, Any]:
        def figures(figs: dict[str, Figure] | None) -> dict[str, float] | None:
            return None if figs is None else {k: f.relative for k, f in figs.items()}

        document = {
            "passed": self.passed,
            "input_shape": self.input_shape,
            "samples": self.samples,
            "seed": self.seed,
            "dtype": self.dtype,
            "exact_max": worst(self.exact),
            "exact_limit": self.exact_limit,
            "written_max": worst(self.written),
            "written_rtol": self.written_rtol,
            "written_atol": self.written_atol,
            "exact": figures(self.exact),
            "written": figures(self.written),
            "suspects": self.suspects,
        }
        if self.tensors is not None:  # convert's metadata stays as it was
            document["tensors"] = self.tensors.to_dict()
        return document

    def failure_message(self) -> str:
        parts = []
        if not self.tensors_passed:
            parts.append(
                "the file's tensors are not what the train checkpoint converts to: "
                + "; ".join(self.tensors.problems())
            )
        if self.written is None:
            parts.append("the file was not run: its keys or shapes do not fit the model")
        if not self.exact_passed:
            parts.append(
                f"the fused math is off: exact error {worst(self.exact):.3g} "
                f"> limit {self.exact_limit:g}"
            )
        if self.written is not None and not self.written_passed:
            parts.append(
                f"the written weights are off: error {worst(self.written):.3g} "
                f"> rtol {self.written_rtol:g} (atol {self.written_atol:g})"
            )
        if self.suspects:
            named = ", ".join(
                f"{s['path']} ({s['rule']}, {s['block_error']:.3g})" for s in self.suspects[:5]
            )
            parts.append(f"blocks whose own outputs diverge: {named}")
        # verify has no per-block figures to clear the blocks; its tensor check names changes.
        elif self.tensors is None and self.exact_passed and not self.written_passed:
            parts.append("every block is exact, so the loss is rounding to the output dtype")
        return "verification failed: " + "; ".join(parts)


def judge(
    reference: Reference,
    exact: dict[str, Figure] | None,
    written: dict[str, Figure],
    written_dtypes: set[torch.dtype],
    outcomes: Sequence[Outcome],
    *,
    exact_limit: float,
    atol: float | None,
    rtol: float | None,
) -> Verification:
    """A conversion's verification: its figures against their limits, and the blocks suspected.

    Blocks are judged by the exact limit when the exact figure was taken, else by the written one.
    """
    verification = Verification(
        input_shape=reference.shape,
        samples=reference.samples,
        seed=reference.seed,
        dtype=str(reference.dtype).removeprefix("torch."),
        exact=exact,
        written=written,
        exact_limit=exact_limit,
        **written_tolerances(written_dtypes, atol, rtol),
    )
    limit = exact_limit if exact is not None else verification.written_rtol
    verification.suspects = suspects(outcomes, limit)
    return verification
