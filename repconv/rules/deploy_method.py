"""Fallback: a block none of the structural rules knows, but which carries its own deploy method.

Many libraries ship re-parameterizable blocks with a method that folds them (MobileOne's
`reparameterize`, YOLO's `fuse_convs`, RepViT's `fuse`, ...). This pass calls it the way the
library's own model-level tooling does, and trusts none of it:

- children first: the steps come deepest-first (post-order), so a parent's method finds its
  children already fused, as the libraries' model-level passes (`fuse_model`, `replace_batchnorm`)
  leave them. A method on the root or on a container is just the last step of its subtree;
- a method that returns a module other than the block (RepViT, LeViT, EfficientViT) has that
  module put in the block's place, as `replace_batchnorm` / timm's `reparameterize_model` do;
- a class with `forward_fuse` whose plain `forward` no longer runs once the method removed its
  train children (ultralytics `Conv`/`RepConv`) gets `forward = forward_fuse` on that instance,
  as the library's model-level `fuse()` does;
- the method runs with torch's default dtype set to the block's (float32 for half blocks, the
  only other default torch allows), so tensors it builds without a dtype match the block;
- the block is probed before and after by the check the engine hands the pass
  (`rules.base.BlockCheck`; by default `block_check.ProbeCheck`); a method that raises, or moves
  the block's output by more than the probe's limit, is undone: the block is put back as a
  snapshot taken before the call and the step is skipped (NotFusable) with the method and the
  error in the warning. A block without a probe is judged by the whole-model verification only.
  A method that calls `sys.exit` is undone too, and is an error (BadInput): never a silent exit.

A parent whose method fails (or is wrong) on its fused children is tried once more the other way
round, as timm's `reparameterize_model` goes: put back as it was before its first child was fused
(a copy taken then, inside the apply), its method calls its children's own (RepViT's `RepVggDw`
calls its `ConvNorm`s' `fuse()`). Checked the same way; if that fails too, the block is left as
its children's methods left it. The root is not copied this way (a copy of the whole model).
Those copies are the pass's own, kept by its run (`DeployMethodRun`) for one apply.

Whatever a method leaves (fused or undone) is offered to the passes after this one (conv -> BN
pairs): the run's follow-up steps, planned by the engine (`RunContext.plan_after`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Set as AbstractSet

import torch
from torch import nn

from repconv.errors import BadInput, NotFusable, RepconvError
from repconv.modules import (
    default_dtype,
    floating_dtype,
    is_norm_like,
    join_path,
    param_count,
    put_module,
)
from repconv.paths import within
from repconv.rules import convbn
from repconv.rules.base import BlockCheck, BlockProbe, Pass, PassRun, RunContext, Step

NAME = "deploy_method"
SUMMARY = "a block's own deploy method, for blocks no structural rule matches (children first)"
DEPLOY_FORM = "whatever the block's method leaves behind (or returns)"

# Order of preference when a block has several of these: the names that mean "the whole
# re-parameterization of this block" first, then the narrower or more generic ones.
METHOD_NAMES = (
    "switch_to_deploy",  # RepVGG, ACNet, DBB, YOLOv6, RepGhost
    "reparameterize",  # MobileOne, FastViT
    "convert_to_deploy",  # RepGhost (model level)
    "reparameterize_model",
    "merge_kernel",  # RepLKNet
    "merge_dilated_branches",  # UniRepLKNet
    "fuse_repvgg_block",  # yolov7
    "fuse_block_residual_branches",  # super-gradients
    "full_fusion",  # super-gradients
    "structural_reparam",
    "local_inject",  # RepMLP
    "fuse_convs",  # ultralytics RepConv, yolov9 RepConvN
    "fuse_reparam",
    "fuse",  # RepViT, LeViT, EfficientViT, RepNeXt (returns a module)
)


def deploy_method(module: nn.Module) -> str | None:
    """The first method in METHOD_NAMES that the module defines and that needs no arguments."""
    for name in METHOD_NAMES:
        method = getattr(type(module), name, None)
        if not callable(method) or getattr(nn.Module, name, None) is not None:
            continue
        try:
            signature = inspect.signature(getattr(module, name))
        except (TypeError, ValueError):
            continue
        required = [
            p
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not required:
            return name
    return None


def holds_norm(module: nn.Module) -> bool:
    return any(is_norm_like(m) for m in module.modules())


# ---- running a method safely ------------------------------------------------------------------


def _floating_dtype(module: nn.Module) -> torch.dtype:
    return floating_dtype(module) or torch.get_default_dtype()


def _uses_forward_fuse(block: nn.Module, probe: BlockProbe | None, removed: bool) -> None:
    """Switch an instance to its class's `forward_fuse` when its plain forward no longer runs."""
    if not callable(getattr(type(block), "forward_fuse", None)) or "forward" in vars(block):
        return
    if probe is not None:
        try:
            with torch.no_grad():
                block(probe.input)
            return
        except Exception:  # what forward uses is gone: the library would switch now
            pass
    elif not removed:
        return
    block.forward = block.forward_fuse


def call_method(block: nn.Module, name: str) -> tuple[nn.Module, set[str]]:
    """Call the block's method as its library does; the module that now stands for the block."""
    children = set(block._modules)
    with default_dtype(_floating_dtype(block)):
        returned = getattr(block, name)()
    result = returned if isinstance(returned, nn.Module) and returned is not block else block
    result.eval()
    return result, children - set(result._modules)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_checked(model: nn.Module, path: str, name: str, check: BlockCheck) -> None:
    """Run the block's method at `path`, keep the result only if it computes what the block did.

    Anything else (the method raised, or the output moved beyond the probe's limit) puts the
    snapshot back and raises NotFusable naming the method and why.
    """
    block = model.get_submodule(path)
    snapshot = copy.deepcopy(block)
    probe = check.probe(block)
    dtype = _floating_dtype(block)
    try:
        result, removed = call_method(block, name)
        if dtype != torch.float64:  # as the engine would: a half block's method ran in float32
            result.to(dtype)
        _uses_forward_fuse(result, probe, bool(removed))
        error = probe.error_of(result) if probe is not None else 0.0
    except (KeyboardInterrupt, RepconvError):
        put_module(model, path, snapshot)
        raise
    except SystemExit as exc:  # library code must not end the conversion, least of all as success
        put_module(model, path, snapshot)
        raise BadInput(
            f"{path or '<root>'}: {type(block).__name__}.{name}() called sys.exit({exc.code!r})"
        ) from None
    except Exception as exc:  # a library method may fail in any way: never crash on it
        put_module(model, path, snapshot)
        raise NotFusable(f"{name}() failed, block left as it was: {_first_line(exc)}") from None
    if probe is not None and not error <= probe.limit:
        put_module(model, path, snapshot)
        raise NotFusable(
            f"{name}() changed the block's output by {error:.3g} (relative, limit "
            f"{probe.limit:g}); undone, block left as it was"
        )
    put_module(model, path, result)


class DeployMethodPass(Pass):
    """The fallback: a block's own deploy method, children first, checked and undone if wrong."""

    name = NAME
    family = "any"
    summary = SUMMARY
    deploy_form = DEPLOY_FORM
    kind = "fallback"

    def family_of(self, module: nn.Module) -> str:
        return type(module).__name__

    def find(self, root: nn.Module, claimed: AbstractSet[int], at: str = "") -> list[Step]:
        """Every unclaimed module with a deploy method and a norm inside, children first."""
        steps: list[Step] = []
        seen: set[int] = set()

        def visit(module: nn.Module, path: str) -> None:
            if id(module) in claimed or id(module) in seen:
                return
            seen.add(id(module))
            for child_name, child in module.named_children():
                visit(child, join_path(path, child_name))
            method = deploy_method(module) if holds_norm(module) else None
            if method:
                family = self.family_of(module)
                steps.append(Step(path, self, family, f"{method}()", param_count(module)))

        visit(root, at)
        return steps

    def open(self, context: RunContext) -> DeployMethodRun:
        return DeployMethodRun(self, context)


class DeployMethodRun(PassRun):
    """The pass in one apply. It keeps, for each ancestor of a step that has a method of its own
    (the root excepted), a copy taken before the ancestor's first descendant was fused (None:
    the ancestor has no method), so that a parent failing on its fused children can be called
    again parent first."""

    def __init__(self, owner: Pass, context: RunContext):
        super().__init__(owner, context)
        self.before_children: dict[str, nn.Module | None] = {}
        self.fused: list[str] = []  # the blocks whose method ran, in order

    def fuse(self, step: Step) -> None:
        model = self.context.model
        method = deploy_method(model.get_submodule(step.path))
        if method is None:
            raise NotFusable(f"{step.family} has no deploy method any more")
        self._keep_ancestors_as_they_are(step.path)
        before_children = self.before_children.pop(step.path, None)
        try:
            try:
                run_checked(model, step.path, method, self.context.check)
            except NotFusable as children_first:
                if before_children is None:
                    raise
                self._run_parent_first(step.path, method, before_children, children_first)
        except NotFusable as failed:
            if any(within(p, step.path) for p in self.fused):
                left = f"{failed} (as its children's own methods left it)"
                raise NotFusable(left) from None
            self._run_with_pairs_folded(step.path, method, failed)
        self.fused.append(step.path)

    def follow_ups(self, step: Step) -> list[Step]:
        """What the block's method left (or, undone, the block as it was) for the passes after
        this one: the conv -> BN pairs a method leaves, those of a block whose method failed."""
        return self.context.plan_after(step)

    def _keep_ancestors_as_they_are(self, path: str) -> None:
        """Copy each ancestor of `path` that has a method of its own, the first time one of its
        descendants is about to be fused (children come first, so nothing inside it has
        changed yet). Each ancestor is judged once per apply."""
        parts = path.split(".") if path else []
        for depth in range(1, len(parts)):
            ancestor = ".".join(parts[:depth])
            if ancestor not in self.before_children:
                module = self.context.model.get_submodule(ancestor)
                self.before_children[ancestor] = _copy_if_method(module)

    def _run_with_pairs_folded(self, path: str, method: str, failed: NotFusable) -> None:
        _fold_pairs_then_run(self.context.model, path, method, self.context.check, failed)

    def _run_parent_first(
        self, path: str, method: str, unfused: nn.Module, first: NotFusable
    ) -> None:
        """The block's method on the copy from before its children were fused; on failure, the
        block as the children's methods left it, and the first error with this one."""
        model = self.context.model
        children_fused = model.get_submodule(path)
        put_module(model, path, unfused)
        try:
            run_checked(model, path, method, self.context.check)
        except NotFusable as parent_first:
            put_module(model, path, children_fused)
            raise NotFusable(
                f"{first} (called before its children's too: {parent_first})"
            ) from None


def _fold_pairs_then_run(
    model: nn.Module, path: str, method: str, check: BlockCheck, first: NotFusable
) -> None:
    """The block's method once its own plain conv -> BN pairs are folded, as libraries whose
    methods read a fused conv's bias run it (YOLOv6's `switch_to_deploy` after `fuse_model`);
    on failure the block as it was, and the first error with this one."""
    pairs = convbn.find_pairs(model.get_submodule(path), set(), path)
    if not pairs:
        raise first
    as_it_was = copy.deepcopy(model.get_submodule(path))
    try:
        for pair in pairs:
            convbn.fuse_pair(model, pair)
        run_checked(model, path, method, check)
    except NotFusable as again:
        put_module(model, path, as_it_was)
        raise NotFusable(f"{first} (with its conv + BN pairs folded first too: {again})") from None
    except Exception:
        put_module(model, path, as_it_was)
        raise


def _copy_if_method(module: nn.Module) -> nn.Module | None:
    return copy.deepcopy(module) if deploy_method(module) and holds_norm(module) else None


PASS = DeployMethodPass()
