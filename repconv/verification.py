"""Verification: does the deploy model compute what the train model computed?

Outputs are compared per tensor as max|deploy - ref| / max|ref|. Two figures, both by default
with activations in float64 so that rounding in the passes neither hides a bug nor fails a correct
conversion: `exact` runs the fused weights before they are rounded (it judges the math alone) and
`written` runs them exactly as they will be written (it judges the file).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from repconv.compare import flatten_outputs
from repconv.errors import BadInput

try:
    import resource
except ImportError:  # not on Windows
    resource = None

EXACT_LIMIT = 1e-6
# Rounding the fused weights to the output dtype costs about 1e-6 (float32) or 1e-3 (float16)
# relative error on a small net; these limits leave room for depth without hiding a lost branch.
WRITTEN_LIMITS = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def written_limit(dtype: torch.dtype) -> float:
    return WRITTEN_LIMITS.get(dtype, 1e-2)


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
ALLOCATION_FAILURES = ("can't allocate memory", "not enough memory", "cannot allocate memory")


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


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(m in text for m in ALLOCATION_FAILURES)


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


def run(model: nn.Module, inputs: Sequence[Tensor]) -> list[Any]:
    with torch.no_grad():
        return [model(x) for x in inputs]


@dataclass
class Figure:
    """The worst error of one output tensor over all samples."""

    max_abs: float = 0.0
    scale: float = 0.0

    @property
    def relative(self) -> float:
        if self.max_abs != self.max_abs:  # NaN
            return float("inf")
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    def passes(self, atol: float, rtol: float) -> bool:
        return self.max_abs <= atol + rtol * self.scale


def measure(outputs: Sequence[Any], references: Sequence[Any]) -> dict[str, Figure]:
    """Per output tensor: worst |diff| and the reference's max |value| over the samples."""
    figures: dict[str, Figure] = {}
    for out, ref in zip(outputs, references, strict=True):
        got, want = flatten_outputs(out), flatten_outputs(ref)
        if [n for n, _ in got] != [n for n, _ in want]:
            figures["output structure"] = Figure(float("inf"), 1.0)
            continue
        for (name, a), (_, r) in zip(got, want):
            fig = figures.setdefault(name, Figure())
            if a.shape != r.shape:
                fig.max_abs = float("inf")
                continue
            r64 = r.detach().to(torch.float64)
            diff = (a.detach().to(torch.float64) - r64).abs()
            worst = float(diff.max()) if diff.numel() else 0.0
            fig.max_abs = max(fig.max_abs, worst if worst == worst else float("inf"))
            fig.scale = max(fig.scale, float(r64.abs().max()) if r64.numel() else 0.0)
    return figures


def worst(figures: dict[str, Figure] | None) -> float | None:
    if figures is None:
        return None
    return max((f.relative for f in figures.values()), default=0.0)


@dataclass
class Verification:
    """The outcome of comparing a deploy model against its train model."""

    input_shape: list[int]
    samples: int
    seed: int
    dtype: str
    exact: dict[str, Figure] | None
    written: dict[str, Figure]
    exact_limit: float
    written_atol: float
    written_rtol: float
    suspects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exact_passed(self) -> bool:
        return self.exact is None or all(
            f.passes(0.0, self.exact_limit) for f in self.exact.values()
        )

    @property
    def written_passed(self) -> bool:
        return all(f.passes(self.written_atol, self.written_rtol) for f in self.written.values())

    @property
    def passed(self) -> bool:
        return self.exact_passed and self.written_passed

    def to_dict(self) -> dict[str, Any]:
        def figures(figs: dict[str, Figure] | None) -> dict[str, float] | None:
            return None if figs is None else {k: f.relative for k, f in figs.items()}

        return {
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

    def failure_message(self) -> str:
        parts = []
        if not self.exact_passed:
            parts.append(
                f"the fused math is off: exact error {worst(self.exact):.3g} "
                f"> limit {self.exact_limit:g}"
            )
        if not self.written_passed:
            parts.append(
                f"the written weights are off: error {worst(self.written):.3g} "
                f"> rtol {self.written_rtol:g} (atol {self.written_atol:g})"
            )
        if self.suspects:
            named = ", ".join(
                f"{s['path']} ({s['rule']}, {s['block_error']:.3g})" for s in self.suspects[:5]
            )
            parts.append(f"blocks whose own outputs diverge: {named}")
        elif self.exact_passed and not self.written_passed:
            parts.append("every block is exact, so the loss is rounding to the output dtype")
        return "verification failed: " + "; ".join(parts)
