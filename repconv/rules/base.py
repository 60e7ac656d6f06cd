"""The pass contract: what a pass, a block rule, a plan step and a rule's fuse result are.

Rules recognise blocks by structure (child names, child types, shapes), never by class, so that
copies of a block in any codebase convert. The facts they ask of modules are in
`repconv.modules`; the fused conv they install is built by `repconv.fused_conv`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, Protocol

from torch import nn

from repconv.fused_conv import Fused
from repconv.modules import join_path
from repconv.sum_check import sums_exactly

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
        if structure and self.folds is not None and not sums_exactly(module, self.folds(module)):
            return None
        return structure

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...] | None:
        return self.fuse(model.get_submodule(step.path)).kernel_shape
