"""The engine: walk the module tree, match rules, record a plan, fuse in place.

Planning is side-effect free, so `inspect` and the verifier can look at a plan before anything
changes. Applying a plan rewrites the model in place (no copies): block rules first, top-down,
then the deploy-method fallback, then conv -> BN pairs over what is left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from repconv import pages
from repconv.compare import compare_outputs
from repconv.errors import CorruptCheckpoint, NotFusable
from repconv.rules import convbn, deploy_method
from repconv.rules.base import Rule, is_norm_like, norm_problem, param_count
from repconv.rules.registry import block_rules


@dataclass
class PlanEntry:
    """One block (or conv -> norm pair) and what happens to it."""

    path: str
    rule: str
    family: str
    structure: str
    params_before: int
    params_after: int | None = None
    kernel_shape: tuple[int, ...] | None = None
    status: str = "planned"  # planned | fused | skipped
    reason: str | None = None
    block_error: float | None = None
    norm_path: str | None = None
    _rule: Rule | None = field(default=None, repr=False, compare=False)
    _method: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["kernel_shape"] = list(self.kernel_shape) if self.kernel_shape else None
        return data


@dataclass
class Plan:
    entries: list[PlanEntry]
    warnings: list[dict[str, str]] = field(default_factory=list)

    def fused_by_rule(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            if e.status == "fused":
                counts[e.rule] = counts.get(e.rule, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": [e.to_dict() for e in self.entries],
            "fused_by_rule": self.fused_by_rule(),
            "warnings": self.warnings,
        }


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_norm_statistics(model: nn.Module) -> None:
    """Refuse a model whose norms hold statistics no trained model has (NaN, Inf, var < 0)."""
    for path, module in model.named_modules():
        if not is_norm_like(module) or getattr(module, "running_var", None) is None:
            continue
        mean, var = module.running_mean, module.running_var
        if var.device.type == "meta":
            continue
        bad = ~torch.isfinite(var) | (var < 0) | ~torch.isfinite(mean)
        if bool(bad.any()):
            raise CorruptCheckpoint(
                f"corrupt checkpoint: norm {path or '<root>'} has NaN, Inf or negative running "
                f"statistics in {int(bad.sum())} of {var.numel()} channels"
            )


# Elements checked at once: bounds the temporaries of the finiteness check to a few MB.
FINITE_CHUNK = 1 << 20


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many NaN or Inf values a floating tensor holds, without a full-size temporary.

    A chunk's sum is finite unless the chunk holds NaN or Inf (or its sum overflows), so the
    exact count is only taken for chunks whose sum is not.
    """
    flat = tensor.detach().reshape(-1)  # a view: checkpoint tensors are contiguous
    accumulate = torch.float64 if flat.dtype == torch.float64 else torch.float32
    bad = 0
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start : start + FINITE_CHUNK]
        if math.isfinite(float(chunk.sum(dtype=accumulate))):
            continue
        bad += int(chunk.numel() - int(torch.isfinite(chunk).sum()))
    return bad


def check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN or Inf in any floating parameter or buffer, naming the first.

    Such a value makes every output it reaches NaN, which verification would otherwise blame
    on the fused math. The pages of memory-mapped tensors are given back once checked, so the
    check does not make the whole file resident at once.
    """
    with pages.PageReleaser() as releaser:
        for path, module in model.named_modules():
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or not tensor.is_floating_point() or tensor.is_meta:
                    continue
                bad = non_finite_count(tensor)
                if bad:
                    raise CorruptCheckpoint(
                        f"corrupt checkpoint: tensor {_join(path, name)} holds {bad} NaN or "
                        f"Inf value(s) of {tensor.numel()}"
                    )
                releaser.release([tensor])


def _subtree_facts(model: nn.Module, rules: Sequence[Rule]) -> dict[int, tuple[bool, bool]]:
    """For each module (by id): (some block rule matches in its subtree, it holds a norm)."""
    facts: dict[int, tuple[bool, bool]] = {}

    def visit(module: nn.Module) -> tuple[bool, bool]:
        if id(module) in facts:
            return facts[id(module)]
        matched = any(rule.match(module) for rule in rules)
        has_norm = is_norm_like(module)
        for child in module.children():
            child_matched, child_norm = visit(child)
            matched, has_norm = matched or child_matched, has_norm or child_norm
        facts[id(module)] = (matched, has_norm)
        return facts[id(module)]

    visit(model)
    return facts


def plan(model: nn.Module, rules: Sequence[Rule] | None = None) -> Plan:
    """Which rule fuses which block, without changing anything."""
    rules = list(block_rules() if rules is None else rules)
    check_norm_statistics(model)
    check_finite(model)
    facts = _subtree_facts(model, rules)
    entries: list[PlanEntry] = []
    opaque: set[int] = set()

    def walk(module: nn.Module, path: str) -> None:
        if id(module) in opaque:
            return
        for rule in rules:
            structure = rule.match(module)
            if structure:
                opaque.add(id(module))
                entries.append(
                    PlanEntry(
                        path, rule.name, rule.family, structure, param_count(module), _rule=rule
                    )
                )
                return
        matched_inside, has_norm = facts[id(module)]
        method = None if matched_inside or not has_norm else deploy_method.deploy_method(module)
        if method:
            opaque.add(id(module))
            entries.append(
                PlanEntry(
                    path,
                    deploy_method.NAME,
                    type(module).__name__,
                    f"{method}()",
                    param_count(module),
                    _method=method,
                )
            )
            return
        for name, child in module.named_children():
            walk(child, _join(path, name))

    walk(model, "")
    modules = dict(model.named_modules())
    for pair in convbn.find_pairs(model, opaque):
        conv = modules[pair.conv_path]
        entries.append(
            PlanEntry(
                pair.conv_path,
                convbn.NAME,
                "conv-BN",
                f"{type(conv).__name__} -> {type(modules[pair.norm_path]).__name__}"
                f" ({pair.found_by})",
                param_count(conv) + param_count(modules[pair.norm_path]),
                norm_path=pair.norm_path,
            )
        )
    return Plan(entries)


def _run(model: nn.Module, entry: PlanEntry, x: torch.Tensor) -> Any:
    if entry.norm_path is not None:
        return model.get_submodule(entry.norm_path)(model.get_submodule(entry.path)(x))
    return model.get_submodule(entry.path)(x)


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _fuse(model: nn.Module, entry: PlanEntry, releaser: pages.PageReleaser) -> None:
    """Fuse one entry; the rules compute in float64, the block keeps the dtype it had.

    The train tensors' pages are given back as soon as the block is fused, before what is left
    in float64 (biases, a deploy method's weights) is rounded.
    """
    module = model.get_submodule(entry.path)
    dtype = _floating_dtype(module)
    consumed = _block_tensors(model, entry)
    _fuse_in_float64(model, entry, module)
    releaser.release(consumed, keep=_block_tensors(model, entry))
    del consumed
    if dtype is not None and dtype != torch.float64:
        module.to(dtype)


def _fuse_in_float64(model: nn.Module, entry: PlanEntry, module: nn.Module) -> None:
    if entry.norm_path is not None:
        entry.kernel_shape = convbn.fuse_pair(model, convbn.Pair(entry.path, entry.norm_path, ""))
        entry.params_after = param_count(module)
    elif entry._method is not None:
        deploy_method.call_deploy_method(module, entry._method)
        entry.params_after = param_count(module)
    else:
        fused = entry._rule.fuse(module)
        entry.kernel_shape = fused.kernel_shape
        entry.params_after = param_count(module)


PROBE_SIDE = 32


def _probe_shape(seen: Sequence[int] | None) -> tuple[int, ...] | None:
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


def _block_tensors(model: nn.Module, entry: PlanEntry) -> list[torch.Tensor]:
    paths = [entry.path] if entry.norm_path is None else [entry.path, entry.norm_path]
    return [t for path in paths for t in pages.tensors_of(model.get_submodule(path))]


def apply(
    model: nn.Module,
    the_plan: Plan,
    *,
    probe_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Plan:
    """Fuse every planned block in place.

    With `probe_shapes` (input shape per module path, as seen on the reference pass), each block
    is run on a seeded random input before and after it is fused, and its own error is recorded,
    so a failing verification can name the blocks at fault. The pages of memory-mapped train
    tensors a block no longer holds are given back as it is fused (see `pages`).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), pages.PageReleaser() as releaser:
        for entry in the_plan.entries:
            shape = _probe_shape((probe_shapes or {}).get(entry.path))
            probe = before = None
            if shape is not None:
                dtype = next(model.get_submodule(entry.path).parameters()).dtype
                probe = torch.randn(shape, generator=generator, dtype=dtype)
                before = _run(model, entry, probe)
            try:
                _fuse(model, entry, releaser)
            except NotFusable as exc:
                entry.status, entry.reason = "skipped", str(exc)
                the_plan.warnings.append(
                    {"path": entry.path, "message": f"{entry.rule} not applied: {exc}"}
                )
                continue
            except CorruptCheckpoint as exc:
                raise CorruptCheckpoint(f"corrupt checkpoint at {entry.path}: {exc}") from None
            entry.status = "fused"
            if probe is not None:
                errors = compare_outputs(_run(model, entry, probe), before)
                entry.block_error = max(errors.values(), default=0.0)
    the_plan.warnings += leftover_norm_warnings(model)
    return the_plan


def leftover_norm_warnings(model: nn.Module) -> list[dict[str, str]]:
    """Every norm still in the model, with the reason it could not be folded."""
    warnings = []
    for path, module in model.named_modules():
        if is_norm_like(module):
            reason = norm_problem(module) or "its input is not a conv output used only by it"
            warnings.append({"path": path, "message": f"norm left in place: {reason}"})
    return warnings


def convert_model(
    model: nn.Module,
    *,
    rules: Sequence[Rule] | None = None,
    probe_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Plan:
    """Plan and apply in one go; returns the plan with every entry's outcome."""
    return apply(model, plan(model, rules), probe_shapes=probe_shapes)
