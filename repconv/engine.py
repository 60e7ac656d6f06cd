"""The engine: walk the module tree, run the passes, record a plan, fuse in place.

Planning is side-effect free, so `inspect` and the verifier can look at a plan before anything
changes. The passes (`rules.registry.passes`) run in a documented order (see `rules.base.Pass`):
block rules first, top-down, then the deploy-method fallback (children first), the data-flow
pass, then conv -> BN pairs over what is left. Applying a plan opens each pass for that apply
(`Pass.open`: the run owns whatever the pass keeps between its steps), rewrites the model in place
(no copies) and returns each step's `Outcome`; the plan itself is not changed. A step may open
follow-up steps (what a deploy method leaves goes to the passes after it), applied right after it.
The engine judges nothing: an observer from `verification` may watch each block as it is fused,
and the passes are handed the check they judge their own changes by (`rules.base.BlockCheck`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from repconv import memo, pages
from repconv.block_check import ProbeCheck
from repconv.errors import CorruptCheckpoint, NotFusable, RepconvError, note_block
from repconv.modules import (
    corrupt_statistics,
    floating_dtype,
    is_norm_like,
    join_path,
    norm_problem,
    param_count,
    put_module,
)
from repconv.paths import within
from repconv.plan_record import BlockRecord, PlanRecord, WarningRecord
from repconv.rules.base import BlockCheck, Pass, PassRun, Rule, RunContext, Step
from repconv.rules.registry import passes as registered_passes
from repconv.turns import one_at_a_time

__all__ = ["Applied", "Outcome", "Plan", "Step", "apply", "convert_model", "plan"]

Status = Literal["fused", "skipped"]
PlannedStatus = Literal["planned", "fused", "skipped"]
# Called with a step before it is fused; what it returns (if anything) is called once the step
# is fused and gives the block's own error.
BlockObserver = Callable[[nn.Module, Step], Callable[[], float] | None]


def _block_record(
    step: Step,
    status: PlannedStatus = "planned",
    reason: str | None = None,
    params_after: int | None = None,
    kernel_shape: tuple[int, ...] | None = None,
    block_error: float | None = None,
) -> BlockRecord:
    """One block as the recorded plan (deploy metadata, `--json`) lists it."""
    return BlockRecord(
        path=step.path,
        rule=step.rule,
        family=step.family,
        structure=step.structure,
        params_before=step.params_before,
        params_after=params_after,
        kernel_shape=kernel_shape,
        status=status,
        reason=reason,
        block_error=block_error,
        norm_path=step.norm_path,
    )


@dataclass(frozen=True)
class Kept:
    """Modules a plan keeps as they are (the user's deploy model has them: a live conv + BN
    pair, a post-sum BN, an SE block): no pass plans on them, and the data-flow pass sees them
    as leaves, so no region crosses them. A block rule is not offered a module holding one; a
    step of another pass on such a module is checked to leave it as it was (`KeptIntact`)."""

    paths: tuple[str, ...] = ()

    def ids(self, model: nn.Module) -> set[int]:
        return {id(model.get_submodule(p)) for p in self.paths}

    def allows(self, step: Step) -> bool:
        """A step may not consume a kept module, nor anything inside one."""
        return not any(within(c, k) for c in step.claims for k in self.paths)

    def under(self, path: str) -> list[str]:
        """The kept modules strictly inside the module at `path`."""
        return [k for k in self.paths if k != path and within(k, path)]


class KeptIntact:
    """A step on a module holding kept ones: the module as it was before (to put back), and
    whether the step left each kept module the same object with the same values."""

    def __init__(self, model: nn.Module, path: str, kept: Sequence[str]):
        self.path, self.kept = path, kept
        self.before = copy.deepcopy(model.get_submodule(path))
        self.objects = {k: model.get_submodule(k) for k in kept}

    def broken(self, model: nn.Module) -> str | None:
        """The first kept module the step removed or changed, or None."""
        for path, module in self.objects.items():
            try:
                now = model.get_submodule(path)
            except AttributeError:
                return path
            twin = self.before.get_submodule(path[len(self.path) + 1 :] if self.path else path)
            values = zip(now.state_dict().values(), twin.state_dict().values())
            if now is not module or not all(torch.equal(a, b) for a, b in values):
                return path
        return None

    def undo(self, model: nn.Module) -> None:
        put_module(model, self.path, self.before)


@dataclass
class Plan:
    """What will be done: one step per block (or conv -> norm pair), in the order of fusing."""

    entries: list[Step]
    # The passes the plan was made with, in order: a step's follow-ups are found by the passes
    # after its own.
    passes: list[Pass] = field(default_factory=list, repr=False)
    kept: Kept = field(default_factory=Kept)
    # Registered passes the plan was made without, with why (see `plan`).
    left_out: dict[str, str] = field(default_factory=dict)
    left_out_passes: list[Pass] = field(default_factory=list, repr=False)

    def record(self) -> PlanRecord:
        """The plan as recorded before it is applied: every block planned."""
        return PlanRecord(tuple(_block_record(s) for s in self.entries), left_out=self.left_out)

    def to_dict(self) -> dict[str, Any]:
        return self.record().to_json()


@dataclass(frozen=True)
class Outcome:
    """How one step went."""

    step: Step
    status: Status
    reason: str | None = None
    params_after: int | None = None
    kernel_shape: tuple[int, ...] | None = None
    block_error: float | None = None

    # The step's own fields, so an outcome reads like the block it is about.

    @property
    def path(self) -> str:
        return self.step.path

    @property
    def rule(self) -> str:
        return self.step.rule

    @property
    def family(self) -> str:
        return self.step.family

    @property
    def structure(self) -> str:
        return self.step.structure

    @property
    def params_before(self) -> int:
        return self.step.params_before

    @property
    def norm_path(self) -> str | None:
        return self.step.norm_path

    def record(self) -> BlockRecord:
        return _block_record(
            self.step,
            self.status,
            self.reason,
            self.params_after,
            self.kernel_shape,
            self.block_error,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.record().to_json()


@dataclass
class Applied:
    """What `apply` did: the plan, one outcome per step, and what was left unfolded."""

    plan: Plan
    entries: list[Outcome]
    warnings: list[dict[str, str]] = field(default_factory=list)

    def fused_by_rule(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.entries:
            if outcome.status == "fused":
                counts[outcome.rule] = counts.get(outcome.rule, 0) + 1
        return counts

    def record(self) -> PlanRecord:
        """The plan as recorded (deploy metadata, `--json`): each block with its outcome."""
        return PlanRecord(
            blocks=tuple(o.record() for o in self.entries),
            fused_by_rule=self.fused_by_rule(),
            warnings=tuple(WarningRecord(w["path"], w["message"]) for w in self.warnings),
            left_out=self.plan.left_out,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.record().to_json()


def check_norm_statistics(model: nn.Module) -> None:
    """Refuse a model whose norms hold statistics no trained model has (NaN, Inf, var < 0)."""
    for path, module in model.named_modules():
        corrupt = corrupt_statistics(module) if is_norm_like(module) else None
        if corrupt is not None:
            raise CorruptCheckpoint(
                f"corrupt checkpoint: norm {path or '<root>'} has NaN, Inf or negative running "
                f"statistics in {corrupt[0]} of {corrupt[1]} channels"
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
                        f"corrupt checkpoint: tensor {join_path(path, name)} holds {bad} NaN or "
                        f"Inf value(s) of {tensor.numel()}"
                    )
                releaser.release([tensor])


class _EarlierPasses:
    """A walk pass's scope: what the passes before it match in a module's subtree."""

    def __init__(self, passes: Sequence[Pass], index: int, matched: dict[tuple[int, int], bool]):
        self.passes, self.index, self.matched = passes, index, matched

    def matched_inside(self, module: nn.Module) -> bool:
        key = (self.index, id(module))
        if key not in self.matched:
            self.matched[key] = any(
                p.match_module(module, _EarlierPasses(self.passes, i, self.matched))
                for i, p in enumerate(self.passes[: self.index])
            ) or any(self.matched_inside(child) for child in module.children())
        return self.matched[key]


def _walk(model: nn.Module, passes: Sequence[Pass], kept: Kept) -> tuple[list[Step], set[int]]:
    """Top-down, the first pass matching a module claims it; claimed subtrees are opaque.
    A module holding a kept one is not offered (its children are)."""
    matched: dict[tuple[int, int], bool] = {}
    scopes = [_EarlierPasses(passes, i, matched) for i in range(len(passes))]
    steps: list[Step] = []
    claimed: set[int] = kept.ids(model)

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in claimed:
            return
        for each, scope in zip(passes, [] if kept.under(path) else scopes):
            structure = each.match_module(module, scope)
            if structure:
                claimed.add(id(module))
                family = each.family_of(module)
                steps.append(Step(path, each, family, structure, param_count(module)))
                return
        for name, child in module.named_children():
            visit(child, join_path(path, name))

    visit(model, "")
    return steps, claimed


@one_at_a_time
def plan(
    model: nn.Module,
    rules: Sequence[Rule] | None = None,
    *,
    keep: Sequence[str] = (),
    leave_out: Mapping[str, str] | None = None,
) -> Plan:
    """Which pass fuses which block, without changing anything.

    `rules` replaces the registered block rules; the passes after them run either way. `keep`
    names modules to leave as they are (see `Kept`). `leave_out` names passes (by `name`) the
    plan is made without, follow-ups included, each with why: what one of them would have
    fused (a find-stage pass: `Pass.find`) is reported with that reason.
    """
    leave_out = dict(leave_out or {})
    registered = registered_passes(rules)
    passes = [p for p in registered if p.name not in leave_out]
    left_out = [p for p in registered if p.name in leave_out]
    if any(p.folds_plain_pairs_only for p in left_out):  # then no pass folds plain pairs
        passes = [p.keeping_plain_pairs() for p in passes]
    kept = Kept(tuple(keep))
    check_norm_statistics(model)
    check_finite(model)
    steps, claimed = _walk(model, passes, kept)
    steps += _find(model, "", passes, claimed, kept)
    return Plan(steps, passes, kept, leave_out, left_out)


def _find(
    model: nn.Module, at: str, passes: Sequence[Pass], claimed: AbstractSet[int], kept: Kept
) -> list[Step]:
    """The find-stage passes, in order, over the module at `at`: each skips what the ones
    before it claimed, and what the plan keeps."""
    root = model.get_submodule(at)
    claimed = set(claimed) | kept.ids(model)
    steps: list[Step] = []
    for each in passes:
        found = [s for s in each.find(root, claimed, at) if kept.allows(s)]
        steps += found
        claimed |= {id(model.get_submodule(p)) for s in found for p in s.claims}
    return steps


def _step_tensors(model: nn.Module, step: Step) -> list[torch.Tensor]:
    """The tensors of the modules a step consumes that are still in the model."""
    found = []
    for path in step.claims:
        try:
            found += pages.tensors_of(model.get_submodule(path))
        except AttributeError:  # consumed: the data-flow pass deletes what it folds
            continue
    return found


def _fuse(
    model: nn.Module, step: Step, run: PassRun, releaser: pages.PageReleaser
) -> tuple[tuple[int, ...] | None, int]:
    """Fuse one step: (kernel shape, params after). The block keeps the dtype it had.

    The train tensors' pages are given back as soon as the block is fused, before what is left
    in float64 (biases, a deploy method's weights) is rounded.
    """
    dtype = floating_dtype(model.get_submodule(step.path))
    consumed = _step_tensors(model, step)
    kernel_shape = run.fuse(step)
    module = model.get_submodule(step.path)  # a pass may have put a new module in its place
    params_after = param_count(module)
    releaser.release(consumed, keep=_step_tensors(model, step))
    del consumed
    if dtype is not None and dtype != torch.float64:
        module.to(dtype)
    return kernel_shape, params_after


def _apply_step(
    model: nn.Module,
    step: Step,
    run: PassRun,
    releaser: pages.PageReleaser,
    observer: BlockObserver | None,
    skip: Mapping[tuple[str, str], str],
    kept: Kept,
) -> Outcome:
    if step.refusal is not None:
        return Outcome(step, "skipped", reason=step.refusal)
    if (step.path, step.rule) in skip:
        return Outcome(step, "skipped", reason=skip[step.path, step.rule])
    block_error = observer(model, step) if observer is not None else None
    inside = kept.under(step.path)
    guard = KeptIntact(model, step.path, inside) if inside else None
    try:
        kernel_shape, params_after = _fuse(model, step, run, releaser)
    except NotFusable as exc:
        return Outcome(step, "skipped", reason=str(exc))
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"corrupt checkpoint at {step.path}: {exc}") from None
    except Exception as exc:
        if not isinstance(exc, RepconvError):
            note_block(exc, step.path)  # an internal error: say which block it happened in
        raise
    broken = guard.broken(model) if guard is not None else None
    if broken is not None:
        guard.undo(model)
        reason = f"it would change {broken}, which the deploy model keeps as it is; undone"
        return Outcome(step, "skipped", reason=reason)
    error = block_error() if block_error is not None else None
    return Outcome(step, "fused", None, params_after, kernel_shape, error)


@one_at_a_time
def apply(
    model: nn.Module,
    plan: Plan,
    *,
    observer: BlockObserver | None = None,
    check: BlockCheck | None = None,
    skip: Mapping[tuple[str, str], str] | None = None,
) -> Applied:
    """Fuse every planned step in place and return how each went.

    Each pass of the plan is opened for this apply (`Pass.open`); its run fuses its steps and
    may open follow-up steps, applied right after the step that opened them. `check` is how a
    pass judges a change it cannot prove (default `block_check.ProbeCheck`). `observer` (e.g.
    `verification.BlockProbes`) is called with each step before it is fused; the function it
    returns, if any, is called after, for the block's own error. Steps keyed in `skip` by
    (path, rule) are left unfused with that reason, as if their pass had refused them:
    rebuilding a deploy structure replays what its conversion did, undone methods included, on
    a model too empty (on the meta device) to check a method again. The pages of
    memory-mapped train tensors a block no longer holds are given back as it is fused (see
    `pages`).
    """
    skip = skip or {}
    model.eval()
    runs = _open(model, plan, check or ProbeCheck())
    outcomes: list[Outcome] = []
    pending = list(reversed(plan.entries))
    with torch.no_grad(), memo.scope(), pages.PageReleaser() as releaser:
        while pending:
            step = pending.pop()
            run = runs[id(step.by)]
            outcomes.append(_apply_step(model, step, run, releaser, observer, skip, plan.kept))
            pending += reversed(run.follow_ups(step))
    warnings = [
        {"path": o.path, "message": f"{o.rule} not applied: {o.reason}"}
        for o in outcomes
        if o.status == "skipped"
    ]
    # a pass left out says more (it names the option that folds the norm) than a block's form
    left_alone = _kept_by_methods(model, outcomes) | _left_alone(model, plan)
    return Applied(plan, outcomes, warnings + leftover_norm_warnings(model, left_alone))


def _kept_by_methods(model: nn.Module, outcomes: Sequence[Outcome]) -> dict[str, str]:
    """The norms a block's own deploy method left in it (YOLOv6's QARepVGG keeps its post-sum
    BN for quantization-aware training): part of that block's deploy form."""
    reasons: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.status != "fused" or outcome.step.by.kind != "fallback":
            continue
        block = _present(model, outcome.path)  # gone when a parent's method ran after it
        if block is None:
            continue
        for path, module in block.named_modules(prefix=outcome.path):
            if is_norm_like(module):
                reasons[path] = f"kept by the block's own deploy form ({outcome.structure})"
    return reasons


def _open(model: nn.Module, plan: Plan, check: BlockCheck) -> dict[int, PassRun]:
    """Every pass of the plan opened for one apply (by id: passes need not be hashable)."""
    passes = list(plan.passes)
    for step in plan.entries:  # a plan made by hand may name passes it was not made with
        if all(step.by is not p for p in passes):
            passes.append(step.by)
    runs = {}
    for index, each in enumerate(passes):
        later = passes[index + 1 :] if index < len(plan.passes) else []
        context = RunContext(model, check, functools.partial(_plan_after, model, plan, later))
        runs[id(each)] = each.open(context)
    return runs


def _plan_after(model: nn.Module, plan: Plan, later: Sequence[Pass], step: Step) -> list[Step]:
    """What the find-stage passes in `later` find in the block a step left (fused or not).

    Every other planned step inside the block has run by now (block rules first, deploy
    methods children first); the modules at their paths stay opaque, as in the plan. Steps of
    the block's own pass inside it (children's methods) leave plain modules that are part of
    its data flow (RepViT's RepVggDw sums its fused children): those are open.
    """
    prefix = f"{step.path}." if step.path else ""
    inner = {
        s.path
        for s in plan.entries
        if s.path.startswith(prefix) and s.path != step.path and s.by is not step.by
    }
    opaque = {id(m) for p, m in model.named_modules() if p in inner}
    return _find(model, step.path, later, opaque, plan.kept)


def _left_alone(model: nn.Module, plan: Plan) -> dict[str, str]:
    """The norms a pass the plan left out would have folded, each with why it was left out
    (left out, the conv -> BN pass takes with it every plain pair another pass would fold)."""
    reasons: dict[str, str] = {}
    for each in plan.left_out_passes:
        found = each.find(model, set())
        if each.folds_plain_pairs_only:  # the pairs the other passes kept live for it
            found += [s for p in plan.passes for s in p.plain_pairs_in(model)]
        for step in found:
            for path in step.claims:
                module = _present(model, path)
                if module is not None and is_norm_like(module):
                    reasons.setdefault(path, plan.left_out[each.name])
    return reasons


def _present(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def leftover_norm_warnings(
    model: nn.Module, left_alone: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """Every norm still in the model, with the reason it was not folded (`left_alone`: norms
    kept on purpose, with why)."""
    left_alone = left_alone or {}
    warnings = []
    for path, module in model.named_modules():
        if is_norm_like(module):
            reason = left_alone.get(path) or (
                norm_problem(module, with_act=True)
                or "its input is not a conv output used only by it"
            )
            warnings.append({"path": path, "message": f"norm left in place: {reason}"})
    return warnings


@one_at_a_time
def convert_model(model: nn.Module, *, rules: Sequence[Rule] | None = None) -> Applied:
    """Plan and apply in one go; returns every step's outcome."""
    return apply(model, plan(model, rules))
