"""The pass contract: what a pass, a block rule, a plan step and a rule's fuse result are.

Rules recognise blocks by structure (child names, child types, shapes), never by class, so that
copies of a block in any codebase convert. The facts they ask of modules are in
`repconv.modules`; the fused conv they install is built by `repconv.fused_conv`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from torch import nn

from repconv.fused_conv import Fused
from repconv.kernels import Branch
from repconv.sum_check import sums_exactly

PassKind = Literal["block", "fallback", "regions", "pairs"]


@dataclass(frozen=True)
class Step:
    """One fusion in a plan: which pass fuses which module(s). Nothing about how it went.

    What every pass's step has: the module it is about (`path`, absolute in the model), the
    modules whose output it computes, in data-flow order (`chain`: the first at `path`; what a
    probe runs), the modules it consumes and no later pass may touch (`claims`), and, when the
    pass looked at the module and declines it, the reason (`refusal`: the step is recorded as
    skipped with a warning and claims nothing, so later passes still see the module). What only
    its pass needs to fuse it is the pass's `payload`.
    """

    path: str
    by: Pass = field(repr=False)
    family: str
    structure: str
    params_before: int
    chain: tuple[str, ...] = ()  # () means (path,)
    claims: tuple[str, ...] | None = None  # None means the chain
    refusal: str | None = None
    payload: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Frozen: the defaults are spelled out once, at construction.
        chain = self.chain or (self.path,)
        object.__setattr__(self, "chain", chain)
        claims = () if self.refusal is not None else self.claims
        object.__setattr__(self, "claims", chain if claims is None else tuple(claims))

    @property
    def rule(self) -> str:
        """The name of the pass that fuses this step (`rule` in the recorded plan)."""
        return self.by.name

    @property
    def norm_path(self) -> str | None:
        """The module fused after the first one (a conv's norm), as the recorded plan names it."""
        return self.chain[1] if len(self.chain) > 1 else None


class Scope(Protocol):
    """What the engine tells a pass about the module it is offered on the top-down walk."""

    def matched_inside(self, module: nn.Module) -> bool:
        """Whether a pass tried before this one matches `module` or a module inside it."""
        ...


class BlockProbe(Protocol):
    """A block run once on a seeded input, before a pass changed it."""

    input: Any
    limit: float  # how far the block's output may move (relative), for its dtype

    def error_of(self, module: nn.Module) -> float:
        """The relative error of `module` (what now stands for the block) on the same input."""
        ...


class BlockCheck(Protocol):
    """How a pass judges a change it cannot prove (a block's own deploy method): handed in by
    whoever applies the plan, so that no pass imports a judge."""

    def probe(self, block: nn.Module) -> BlockProbe | None:
        """The block's probe, or None when it runs on no input the check can make."""
        ...


@dataclass(frozen=True)
class RunContext:
    """What the engine hands a pass it opens for one apply."""

    model: nn.Module
    check: BlockCheck
    # The steps the passes after this one find in what a step of this one left in its block
    # (their paths absolute), the other passes' blocks inside it kept whole.
    plan_after: Callable[[Step], list[Step]]


class PassRun:
    """A pass opened for one apply: it owns whatever it keeps between its steps.

    `fuse(step)` rewrites the step's modules in place and returns the fused kernel's shape (None
    when it does not know it); `follow_ups(step)` is called after each of its steps, fused or
    skipped, and returns the steps the step opens (planned, applied right after it).
    """

    def __init__(self, owner: Pass, context: RunContext):
        self.owner, self.context = owner, context

    def fuse(self, step: Step) -> tuple[int, ...] | None:
        return self.owner.fuse_step(self.context.model, step)

    def follow_ups(self, step: Step) -> list[Step]:
        return []


class Pass:
    """A pass of the engine. Block rules, the deploy-method fallback and the conv -> BN fold all
    have this shape; `rules.registry` lists them in the order they run.

    Planning (side-effect free), in two stages:

    - the walk: top-down over the module tree, each module is offered to every pass in order
      through `match_module(module, scope)`, which is cheap, side-effect free and returns None or
      a short description of the structure found (shown by `inspect`). The first pass that
      matches claims the module; its subtree is opaque to every pass after that;
    - data flow: after the walk, each pass's `find(root, claimed, at)` returns the steps it
      takes among the modules not claimed (`claimed` holds their ids; skip them and their
      subtrees); `root` is the module at path `at` of the model (the model itself, or a block a
      step left), and the steps' paths are the model's.

    A pass implements one of the two (the defaults match nothing). A pass object is a
    description, shared by every conversion; `open(context)` gives the `PassRun` that fuses its
    steps in one apply (by default one calling `fuse_step(model, step)`: a pass that keeps
    nothing between steps needs no more). Fusing rewrites the step's modules in place and
    returns the fused kernel's shape (None when it does not know it). It computes in float64
    (the `kernels` helpers do) and rounds each weight at most once, to the block's dtype;
    whatever it leaves in float64 the engine rounds to the dtype the block had. It must leave
    exactly the deploy form that the block's own code expects: train-time children gone, the
    fused conv installed, `deploy` flags set, no batch norm left in the block. When the
    structure is right but the block cannot be folded exactly it raises NotFusable before
    changing anything (the engine records the block as skipped); values no trained model has
    raise CorruptCheckpoint.
    """

    name: str
    family: str
    summary: str
    deploy_form: str = ""
    kind: ClassVar[PassKind] = "block"

    def match_module(self, module: nn.Module, scope: Scope) -> str | None:
        return None

    def family_of(self, module: nn.Module) -> str:
        """The family a matched module is listed under."""
        return self.family

    def find(self, root: nn.Module, claimed: AbstractSet[int], at: str = "") -> list[Step]:
        return []

    def open(self, context: RunContext) -> PassRun:
        """This pass for one apply."""
        return PassRun(self, context)

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...] | None:
        raise NotImplementedError(f"pass {self.name} plans steps it cannot fuse")

    # Plain pairs: a conv with norms before or after it and nothing else (no branch sum). A
    # deploy form may keep them live (`deploy_form`); then the pass that folds nothing but
    # them (`folds_plain_pairs_only`) is left out of the plan, and every other pass plans as
    # `keeping_plain_pairs()` returns it.
    folds_plain_pairs_only: ClassVar[bool] = False

    def keeping_plain_pairs(self) -> Pass:
        """This pass as it plans when the plain pairs stay live (by default, as it is)."""
        return self

    def plain_pairs_in(self, root: nn.Module) -> list[Step]:
        """The plain pairs that this pass, as `keeping_plain_pairs` returns it, leaves in
        `root` and would otherwise fold: so that their norms are reported as kept on purpose."""
        return []


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
    # The branches `fuse` sums, each named by the train child it comes from, computed from the
    # block as it is (pure: the block is not changed). Given, the INT8 report can say which
    # branch makes a fused kernel's outlier channels (`repconv.int8.branch_shares`).
    branches: Callable[[nn.Module], list[tuple[str, Branch]]] | None = None

    def match_module(self, module: nn.Module, scope: Scope) -> str | None:
        structure = self.match(module)
        if structure and self.folds is not None and not sums_exactly(module, self.folds(module)):
            return None
        return structure

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...] | None:
        return self.fuse(model.get_submodule(step.path)).kernel_shape
