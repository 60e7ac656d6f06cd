"""What a pass and a rule are, and the structural helpers every rule shares.

Rules recognise blocks by structure (child names, child types, shapes), never by class, so that
copies of a block in any codebase convert. The helpers here answer the questions every rule asks:
is this child a plain conv, a norm that folds exactly, a conv-then-norm unit; and they build the
fused conv that replaces a block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from repconv.errors import CorruptCheckpoint, NotFusable
from repconv.geometry import Geometry, require_lined_up
from repconv.kernels import Branch, NormStats, add, as_branch, fold_bn

_PLAIN_CONV_FORWARDS = {cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
_PLAIN_NORM_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class Fused:
    """What a rule's fuse step left behind: the new conv's path (relative to the block)."""

    attribute: str
    kernel_shape: tuple[int, ...]
    removed: list[str] = field(default_factory=list)


PassKind = Literal["block", "fallback", "regions", "pairs"]


@dataclass(frozen=True)
class Step:
    """One fusion in a plan: which pass fuses which module(s). Nothing about how it went."""

    path: str
    by: Pass = field(repr=False)
    family: str
    structure: str
    params_before: int
    norm_path: str | None = None
    # A step that fuses parts of its block (the data-flow pass): the modules it consumes, and
    # the modules inside the block that other steps own and it must treat as opaque.
    parts: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()
    # Set when the pass looked at the block and declines it: the step is recorded as skipped
    # with this reason (a warning) and claims nothing, so later passes still see the block.
    refusal: str | None = None

    @property
    def rule(self) -> str:
        """The name of the pass that fuses this step (`rule` in the recorded plan)."""
        return self.by.name

    @property
    def chain(self) -> tuple[str, ...]:
        """The modules the step fuses, in data-flow order: the first at `path`."""
        return (self.path,) if self.norm_path is None else (self.path, self.norm_path)

    @property
    def claims(self) -> tuple[str, ...]:
        """The modules no later pass may touch: the parts the step consumes, else its chain."""
        if self.refusal is not None:
            return ()
        return self.parts or self.chain

    def moved_under(self, prefix: str) -> Step:
        """The same step planned inside the module at `prefix` (paths made absolute)."""
        if not prefix:
            return self

        def join(path: str) -> str:
            return join_path(prefix, path)

        return replace(
            self,
            path=join(self.path),
            norm_path=None if self.norm_path is None else join(self.norm_path),
            parts=tuple(join(p) for p in self.parts),
            opaque=tuple(join(p) for p in self.opaque),
        )


class Scope(Protocol):
    """What the engine tells a pass about the module it is offered on the top-down walk."""

    def matched_inside(self, module: nn.Module) -> bool:
        """Whether a pass tried before this one matches `module` or a module inside it."""
        ...


class Pass:
    """A pass of the engine. Block rules, the deploy-method fallback and the conv -> BN fold all
    have this shape; `rules.registry` lists them in the order they run.

    Planning (side-effect free), in two stages:

    - the walk: top-down over the module tree, each module is offered to every pass in order
      through `match_module(module, scope)`, which is cheap, side-effect free and returns None or
      a short description of the structure found (shown by `inspect`). The first pass that
      matches claims the module; its subtree is opaque to every pass after that;
    - data flow: after the walk, each pass's `find(model, claimed)` returns the steps it takes
      among the modules not claimed (`claimed` holds their ids; skip them and their subtrees).

    A pass implements one of the two (the defaults match nothing). Fusing: `fuse_step(model,
    step)` rewrites the step's modules in place and returns the fused kernel's shape (None when
    it does not know it). It computes in float64 (the `kernels` helpers do) and rounds each
    weight at most once, to the block's dtype; whatever it leaves in float64 the engine rounds
    to the dtype the block had. It must leave exactly the deploy form that the block's own code
    expects: train-time children gone, the fused conv installed, `deploy` flags set, no batch
    norm left in the block. When the structure is right but the block cannot be folded exactly it
    raises NotFusable before changing anything (the engine records the block as skipped);
    values no trained model has raise CorruptCheckpoint.
    """

    name: str
    family: str
    summary: str
    deploy_form: str = ""
    kind: ClassVar[PassKind] = "block"
    # Whether what a step leaves in its block (fused or skipped) is offered, right after the
    # step, to the find-stage passes after this one (the deploy-method pass: the conv -> BN pairs
    # a method left, or those of a block whose method was undone).
    reopens: ClassVar[bool] = False

    def match_module(self, module: nn.Module, scope: Scope) -> str | None:
        return None

    def family_of(self, module: nn.Module) -> str:
        """The family a matched module is listed under."""
        return self.family

    def find(self, model: nn.Module, claimed: AbstractSet[int]) -> list[Step]:
        return []

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...] | None:
        raise NotImplementedError(f"pass {self.name} plans steps it cannot fuse")


@dataclass(frozen=True)
class Rule(Pass):
    """A block rule: recognise a block by its structure, fold it into its own deploy form.

    `match(module)` is cheap and side-effect free; it returns None or a short description of the
    structure it found (used by `inspect`). `fuse(module)` rewrites the block in place, computing
    in float64 and rounding each weight once (to the block's dtype, or left in float64 for the
    engine to round), and returns `Fused`.
    It raises NotFusable when the structure is right but the block cannot be folded exactly.
    The full contract is `Pass`'s: a rule is a pass of the walk.
    """

    name: str
    family: str
    summary: str
    match: Callable[[nn.Module], str | None]
    fuse: Callable[[nn.Module], Fused]
    deploy_form: str = ""
    # The children a matched block's fuse folds. Given, a match by names also needs the block's
    # data flow to agree: its forward sums exactly those children's branches, with no scalar
    # or activation of its own on a branch (else the block goes on to the later passes).
    folds: Callable[[nn.Module], list[str]] | None = None

    def match_module(self, module: nn.Module, scope: Scope) -> str | None:
        structure = self.match(module)
        if structure and self.folds is not None:
            from repconv.rules.dataflow import sums_exactly  # the data-flow pass needs this module

            if not sums_exactly(module, self.folds(module)):
                return None
        return structure

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...] | None:
        return self.fuse(model.get_submodule(step.path)).kernel_shape


# ---- recognising children -------------------------------------------------------------------


def is_plain_conv(module: Any) -> bool:
    """A torch conv whose forward is the stock one (not transposed, no dynamic padding)."""
    return (
        isinstance(module, _ConvNd)
        and not module.transposed
        and type(module).forward in _PLAIN_CONV_FORWARDS
        and type(module)._conv_forward is _CONV_BY_DIMS[len(module.kernel_size)]._conv_forward
    )


def _has_frozen_norm_tensors(module: Any) -> bool:
    """Named like a frozen batch norm, with its four buffers and a float `eps`."""
    if isinstance(module, _BatchNorm) or not isinstance(module, nn.Module):
        return False
    names = set(module._buffers)
    return (
        "FrozenBatchNorm" in type(module).__name__
        and {"weight", "bias", "running_mean", "running_var"} <= names
        and isinstance(getattr(module, "eps", None), float)
    )


def is_frozen_norm(module: Any) -> bool:
    """Frozen batch norms (torchvision, detectron2): buffers only, the same eval formula.

    One with children (timm's FrozenBatchNormAct2d: `drop`, `act`) is not: it does more than
    normalise, and only `is_norm_act` may accept it.
    """
    return _has_frozen_norm_tensors(module) and not module._modules


def norm_problem(module: Any, *, with_act: bool = False) -> str | None:
    """Why this batch-norm-like module cannot be folded, or None if it can.

    `with_act`: a norm-plus-activation module (`is_norm_act`) counts as foldable; only the
    conv -> BN pass may say so, as it alone keeps the `drop` and `act` that follow the norm.
    """
    if is_frozen_norm(module):
        return None
    if _has_frozen_norm_tensors(module):
        if with_act and is_norm_act(module):
            return None
        return f"{type(module).__name__} applies more than the norm (it has children)"
    if not isinstance(module, _BatchNorm):
        return "not a batch norm"
    plain = type(module).forward in _PLAIN_NORM_FORWARDS
    if not plain and not (with_act and is_norm_act(module)):
        return f"{type(module).__name__} overrides forward (adds behaviour to batch norm)"
    if not module.track_running_stats or module.running_var is None:
        return "uses batch statistics even in eval (track_running_stats=False)"
    return None


def is_foldable_norm(module: Any, *, with_act: bool = False) -> bool:
    return norm_problem(module, with_act=with_act) is None


_NORM_ACT_CHILDREN = {"drop", "act"}
_BN_PARAMETERS = {"weight", "bias"}
_BN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}
_PROBE_SHAPES = {nn.BatchNorm1d: (2, -1, 3), nn.BatchNorm3d: (2, -1, 2, 2, 2)}


def is_norm_act(module: Any) -> bool:
    """A norm-plus-activation module (timm's BatchNormAct2d and kin, and FrozenBatchNormAct2d):
    a batch norm subclass or a frozen batch norm whose only children are `drop` and `act`, with
    no tensor of its own beyond the norm's, and whose forward computes exactly
    `act(drop(batch_norm(x)))` in eval mode.

    Any other override of forward is refused. The forward is judged on a surrogate (a copy
    holding synthetic statistics), never on the module's own tensors, so the answer is the same
    for a model on the meta device (load_deploy's rebuild) as for the trained one.
    """
    if set(getattr(module, "_modules", ())) != _NORM_ACT_CHILDREN:
        return False
    if None in module._modules.values() or not _norm_act_tensors(module):
        return False
    try:
        with torch.device("cpu"):  # the probe's tensors are real even inside a meta build
            return _computes_norm_then_act(module)
    except Exception:  # a forward that cannot run on the surrogate is not the norm-act shape
        return False


def _norm_act_tensors(module: nn.Module) -> bool:
    """A batch norm subclass holding only batch norm's tensors (with running statistics), or a
    frozen norm (timm's FrozenBatchNormAct2d) holding only its four buffers."""
    if _has_frozen_norm_tensors(module):
        return not module._parameters and set(module._buffers) <= _BN_BUFFERS | _BN_PARAMETERS
    if not isinstance(module, _BatchNorm) or type(module).forward in _PLAIN_NORM_FORWARDS:
        return False
    if not (set(module._parameters) <= _BN_PARAMETERS and set(module._buffers) <= _BN_BUFFERS):
        return False
    return module.track_running_stats and module.running_var is not None


def _computes_norm_then_act(module: nn.Module) -> bool:
    surrogate = copy.deepcopy(module).to_empty(device="cpu").to(torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*surrogate.named_parameters(), *surrogate.named_buffers()]:
            if tensor.is_floating_point():
                low = -1.0 if name.endswith(("running_mean", "bias")) else 0.5
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + low)
        shape = next((s for c, s in _PROBE_SHAPES.items() if isinstance(module, c)), (2, -1, 3, 3))
        width = surrogate.running_mean.numel()
        x = torch.randn(tuple(width if n == -1 else n for n in shape), generator=generator)
        x = x.to(torch.float64)
        expected = surrogate.act(surrogate.drop(_plain_batch_norm(surrogate, x.clone())))
        got = surrogate(x.clone())
    scale = float(expected.abs().max()) or 1.0
    return got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-12 * scale


def _plain_batch_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    affine = getattr(norm, "affine", True)  # a frozen norm has no flag: always affine
    weight = norm.weight if affine else None
    bias = norm.bias if affine else None
    return nn.functional.batch_norm(
        x, norm.running_mean, norm.running_var, weight, bias, False, 0.0, norm.eps
    )


class NormActTail(nn.Module):
    """What a norm-plus-activation module becomes once its norm is folded into the conv before
    it: its own `drop` and `act`, applied in that order (their keys keep their names)."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def is_norm_like(module: Any) -> bool:
    """Anything that normalises with batch statistics: candidates for warnings when left behind."""
    return isinstance(module, _BatchNorm) or _has_frozen_norm_tensors(module)


def norm_stats(norm: nn.Module, *, with_act: bool = False) -> NormStats:
    """The eval-mode statistics of a foldable norm, checked for values no trained model has."""
    problem = norm_problem(norm, with_act=with_act)
    if problem:
        raise NotFusable(problem)
    mean, var = norm.running_mean, norm.running_var
    if var.device.type != "meta":
        bad = ~torch.isfinite(var) | (var < 0) | ~torch.isfinite(mean)
        if bool(bad.any()):
            raise CorruptCheckpoint(
                "running statistics hold NaN, Inf or negative variance "
                f"({int(bad.sum())} of {var.numel()} channels)"
            )
    affine = getattr(norm, "affine", True)
    weight = norm.weight if affine else None
    bias = norm.bias if affine else None
    return NormStats(mean, var, weight, bias, float(norm.eps))


def conv_bn_unit(module: Any) -> tuple[nn.Module, nn.Module] | None:
    """The (conv, norm) of a conv-then-norm unit: children conv/bn, or a 2-element Sequential."""
    if not isinstance(module, nn.Module):
        return None
    children = dict(module.named_children())
    if set(children) == {"conv", "bn"}:
        conv, norm = children["conv"], children["bn"]
    elif isinstance(module, nn.Sequential) and len(children) == 2:
        conv, norm = list(children.values())
    else:
        return None
    if is_plain_conv(conv) and is_norm_like(norm):
        return conv, norm
    return None


def conv_bn_branch(unit: tuple[nn.Module, nn.Module]) -> tuple[Branch, Geometry]:
    conv, norm = unit
    width = getattr(norm, "num_features", None) or norm.running_mean.numel()
    if width != conv.out_channels:
        raise NotFusable(f"norm has {width} channels, its conv {conv.out_channels}")
    branch = fold_bn(as_branch(conv.weight, conv.bias), norm_stats(norm))
    return branch, Geometry.of(conv)


def lined_up_conv_bn_branch(unit: tuple[nn.Module, nn.Module], target: Geometry) -> Branch:
    """A conv-then-norm unit's branch, refused (NotFusable) unless it lines up with `target`."""
    branch, geometry = conv_bn_branch(unit)
    require_lined_up(geometry, target)
    return branch


# ---- building the fused conv ----------------------------------------------------------------


def fused_conv_like(conv: _ConvNd, branch: Branch, geometry: Geometry | None = None) -> nn.Module:
    """A stock conv with `conv`'s shape and geometry holding the fused kernel and bias.

    Built on the meta device so no random initialisation is spent on weights we overwrite.
    """
    geometry = geometry or Geometry.of(conv)
    cls = _CONV_BY_DIMS[len(conv.kernel_size)]
    with torch.device("meta"):
        fused = cls(
            conv.in_channels,
            branch.kernel.shape[0],
            geometry.kernel_size,
            stride=geometry.stride,
            padding=conv.padding if isinstance(conv.padding, str) else geometry.padding,
            dilation=geometry.dilation,
            groups=conv.groups,
            bias=True,
            padding_mode=geometry.padding_mode,
        )
    fused.weight = nn.Parameter(branch.kernel, requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(branch.bias, requires_grad=conv.weight.requires_grad)
    return fused


def replace_children(block: nn.Module, attribute: str, fused: nn.Module, remove: list[str]) -> None:
    """Install `fused` as `block.<attribute>`, delete train-time children, flip `deploy` flags."""
    for name in remove:
        if hasattr(block, name):
            delattr(block, name)
    setattr(block, attribute, fused)
    if isinstance(getattr(block, "deploy", None), bool):
        block.deploy = True


def install_fused(
    block: nn.Module,
    attribute: str,
    like: _ConvNd,
    branches: list[Branch],
    target: Geometry,
    train_children: list[str],
) -> Fused:
    """Sum the branches into one conv shaped like `like`, install it, drop the train children.

    The kernel is rounded to `like`'s dtype as it is summed; the bias stays float64 until the
    engine rounds the block.
    """
    fused = add(branches, dtype=like.weight.dtype)
    removed = [name for name in train_children if hasattr(block, name)]
    replace_children(block, attribute, fused_conv_like(like, fused, target), removed)
    return Fused(attribute, tuple(fused.kernel.shape), removed)


def join_path(prefix: str, path: str) -> str:
    """A module path under `prefix`; either may be "" (the module itself, the root)."""
    return f"{prefix}.{path}" if prefix and path else prefix or path


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def holds_unclaimed(
    module: nn.Module, claimed: AbstractSet[int], wanted: Callable[[nn.Module], bool]
) -> bool:
    """Whether a `wanted` module sits in `module` outside every claimed one (ids): a find pass
    with nothing left to look at need not trace the model (a RepVGG net after the rules)."""
    if id(module) in claimed:
        return False
    return wanted(module) or any(holds_unclaimed(c, claimed, wanted) for c in module.children())
