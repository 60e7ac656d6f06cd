"""The public workflows: convert a model or a checkpoint file, verify a deploy file, inspect.

Data moves forward only: the checkpoint is read once, the model is built once (around the loaded
tensors), reference outputs are taken before the in-place rewrite, and the deploy tensors are
written once, atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from repconv import (
    arch,
    checkpoint,
    convention,
    deploy_constraint,
    deploy_form,
    deploy_map,
    dtypes,
    engine,
    files,
    layout,
    metadata,
    model_choice,
)
from repconv import verification as V
from repconv.engine import Applied, Plan
from repconv.errors import BadInput, VerificationFailed
from repconv.model_choice import Builder
from repconv.modules import kernel_extent, param_count
from repconv.options import ConvertOptions, recorded_options, takes_options
from repconv.outputs import measure
from repconv.plan_record import PlanRecord
from repconv.rules.base import Rule
from repconv.terminal import shown
from repconv.tolerances import EXACT_LIMIT
from repconv.turns import one_at_a_time

if TYPE_CHECKING:  # imported when an INT8 report is asked for: torch's quantization is heavy
    from repconv.calibration import Calibration
    from repconv.int8_check import Int8Report


@dataclass
class Result:
    """A conversion: the deploy model, its plan, its verification, and the tensors to write."""

    model: nn.Module
    plan: Applied  # the plan with each step's outcome
    verification: V.Verification | None
    state_dict: dict[str, Tensor]
    params_before: int
    params_after: int
    source: dict[str, Any] = field(default_factory=dict)
    # The train model's outputs on the verification inputs (None without verification); the
    # ONNX export is checked against them.
    reference: V.Reference | None = field(default=None, repr=False)
    # How the file reads in the train class by the conv-BN convention (None: not checked).
    convention: convention.ConventionCheck | None = None
    # A same-layout output (`layout.py`): what became of each entry of the input, and the
    # conversions of its other models by key (`source["key"]` names this one's).
    layout: dict[str, str] | None = None
    others: dict[str, Result] = field(default_factory=dict)
    written: bool = False  # whether convert_file wrote the output
    # The INT8 readiness report, when asked for (`convert(..., int8=...)`).
    int8: Int8Report | None = None

    @property
    def noop(self) -> bool:
        """Nothing to fold and nothing left unfolded: the model was already in deploy form."""
        return self.plan.record().form()["form"] == "deploy"

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        document = self._own_dict()
        if self.layout is not None:
            document["layout"] = dict(self.layout)
            document["others"] = {k: r._own_dict() for k, r in self.others.items()}
        return document

    def _own_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "plan": self.plan.record().to_json(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "convention": None if self.convention is None else self.convention.to_dict(),
        }


@one_at_a_time
@takes_options(
    "deploy",
    "check",
    "convert",
    omit=("strict", "force", "state_dict_only", "keep_training_state", "allow_noop"),
)
def convert(
    model: nn.Module,
    options: ConvertOptions | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    deploy_model: nn.Module | None = None,
    int8: Calibration | None = None,
    **keywords: Any,
) -> Result:
    """Convert `model` in place into its deploy form and verify it against itself before.

    The check is set by `options` (a `ConvertOptions`) and/or the keyword arguments of the
    signature (its fields that apply here, with their defaults).
    The model's floating tensors are held in `verify_dtype` during the check (float64 by
    default) and the returned `state_dict` is in the model's own dtypes. No copy of the model
    is made: reference outputs are taken before the rewrite.

    `deploy_model` (your deploy class, built on the meta device or not; or built from
    `deploy_arch` / `deploy_kwargs`): the converted tensors are mapped onto it (`deploy_map`),
    it is what gets verified, and `Result.model` and `Result.state_dict` are its own, so the
    state dict loads into it strictly. BadInput names the paths when it does not fit.

    `int8` (a `calibration.Calibration`): also the INT8 readiness report (`Result.int8`): the
    branches blamed before the fold, the W8A8 simulation on the deploy model as written.
    """
    options = ConvertOptions.merged(options, keywords)
    if deploy_model is None:
        choice = model_choice.choose(options, at_hand=model_choice.GIVEN, train_needed=False)
        deploy_model = _empty(choice.deploy)
    model.eval()
    original = dtypes.of_keys(model)
    if options.verify:
        dtypes.check_holds_weights(dtypes.named(options.verify_dtype), original.values())
    params_before = param_count(model)
    kept = _train_tensors_for(deploy_model, model)
    keep = _kept_by(deploy_model, model, options.input_shape)
    leave_out = deploy_form.passes_left_out(model, options.fold_plain_bn, deploy_model is not None)
    plan = engine.plan(model, rules, keep=keep, leave_out=leave_out)
    dtype_for = dtypes.output_dtypes(original, plan)
    reference = _reference(model, plan, options) if options.verify else None
    probes = reference.block_probes() if reference is not None else None
    # The train class, to read the file by the conv-BN convention (not for a deploy model of
    # the user's, whose names are its own).
    structure = convention.structure_of(model) if reference and deploy_model is None else None
    attributions = _attributions(model, plan) if int8 is not None else {}
    applied = engine.apply(model, plan, observer=probes)
    if deploy_model is not None:
        dtype_for = _fill_deploy(deploy_model, model, kept, dtype_for)
        model = deploy_model
    verification, names = None, None
    if reference is not None:
        verification = _figures(model, reference, applied, dtype_for, options)
        names = _names_check(structure, model, reference, applied, verification)
    dtypes.cast_in_place(model, dtype_for)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    readiness = int8 and _int8_report(model, applied, attributions, int8, reference, options)
    return Result(
        model, applied, verification, state, params_before, param_count(model), reference=reference,
        convention=names, int8=readiness,
    )  # fmt: skip


def _attributions(model: nn.Module, plan: Plan) -> dict[str, Any]:
    from repconv import int8_check

    return int8_check.attribute(model, plan)


def _int8_report(
    model: nn.Module,
    applied: Applied,
    attributions: Mapping[str, Any],
    calibration: Calibration,
    reference: V.Reference | None,
    options: ConvertOptions,
) -> Int8Report:
    """The INT8 report on the deploy model as written: on the calibration inputs, else on the
    verification's seeded ones (a proxy, and the report says so)."""
    from repconv import int8_check

    shape = reference.shape if reference is not None else None
    shape = shape or arch.input_shape_for(model, options.input_shape)
    inputs = calibration.load(shape)
    if inputs is None:
        if reference is not None:
            inputs = reference.inputs
        else:
            inputs = V.make_inputs(shape, options.samples, options.seed, torch.float32)
    return int8_check.report(
        model, applied, attributions, inputs, calibration.source, calibration.path is None
    )


def _names_check(
    structure: nn.Module | None,
    model: nn.Module,
    reference: V.Reference,
    applied: Applied,
    verification: V.Verification,
) -> convention.ConventionCheck | None:
    """The file's tensors (held as it will hold them) read by the conv-BN convention into the
    train class, whole and per fused block (`convention`): NamesLie if a strict load computes
    something else. Only once the conversion is right: a wrong one is verification's to say."""
    if structure is None or not verification.passed:
        return None
    blocks = {
        o.path: reference.block_shapes[o.path]
        for o in applied.entries
        if o.status == "fused" and len(o.step.chain) == 1 and o.path in reference.block_shapes
    }
    return convention.check(
        structure, model, reference.inputs, reference.outputs, blocks, verification.written_rtol
    )


def _train_tensors_for(deploy_model: nn.Module | None, model: nn.Module) -> dict[str, Tensor]:
    """The train tensors a deploy model has keys for, kept before fusing drops them (a deploy
    class may keep dead train branches; they get the train values)."""
    if deploy_model is None:
        return {}
    wanted = set(deploy_model.state_dict(keep_vars=True))
    return {k: v for k, v in model.state_dict().items() if k in wanted}


def _kept_by(
    deploy_model: nn.Module | None, model: nn.Module, input_shape: Sequence[int] | None
) -> list[str]:
    """The train modules the deploy model keeps live as they are: the plan leaves them, so the
    deploy model decides what is fused (`deploy_constraint`)."""
    if deploy_model is None:
        return []
    shape = arch.input_shape_for(model, input_shape)
    return deploy_constraint.kept_by(deploy_model, model, shape)


def _fill_deploy(
    deploy_model: nn.Module,
    fused: nn.Module,
    kept: Mapping[str, Tensor],
    dtype_for: dtypes.DtypeFor,
    what: str = "the deploy model",
) -> dtypes.DtypeFor:
    """Assign the converted tensors to `deploy_model` (`deploy_map`); the dtype each of its
    keys is written in (that of the tensor it came from)."""
    wanted = {k: tuple(v.shape) for k, v in deploy_model.state_dict(keep_vars=True).items()}
    converted = fused.state_dict()
    shapes = {k: tuple(v.shape) for k, v in converted.items()}
    placement = deploy_map.plan_mapping(
        wanted, shapes, {k: tuple(v.shape) for k, v in kept.items()}
    )
    deploy_map.require_complete(placement, what, wanted, shapes)
    # Train tensors (dead branches) are held like the converted ones, in the verification dtype.
    held = next((t.dtype for t in converted.values() if t.is_floating_point()), None)
    state = {
        key: converted[src.key] if src.side == "fused" else _held(kept[src.key], held)
        for key, src in placement.sources.items()
    }
    deploy_model.load_state_dict(state, strict=True, assign=True)
    deploy_model.eval()
    written = {
        key: dtype_for(src.key) if src.side == "fused" else kept[src.key].dtype
        for key, src in placement.sources.items()
    }
    return lambda key: written.get(key) or dtype_for(key)


def _held(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _reference(model: nn.Module, plan: Plan, options: ConvertOptions) -> V.Reference:
    """Hold the model in the verification dtype and take its outputs before anything is fused."""
    shape = arch.input_shape_for(model, options.input_shape)
    dtype = dtypes.named(options.verify_dtype)
    dtypes.hold_all_in(model, dtype)
    return V.take_reference(
        model,
        shape,
        options.samples,
        options.seed,
        dtype,
        _extents(model, plan),
        bool(options.input_shape),
    )


def _extents(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...] | None]:
    """Each planned block's path with the widest kernel it holds (what the reference pass
    needs to know to take the figures at a reduced size)."""
    return {s.path: kernel_extent(model.get_submodule(s.path)) for s in plan.entries}


def _figures(
    model: nn.Module,
    reference: V.Reference,
    applied: Applied,
    dtype_for: dtypes.DtypeFor,
    options: ConvertOptions,
) -> V.Verification:
    """The exact figure (the fused weights unrounded; float64 only), then the written one (the
    weights rounded as the file holds them, computed in the verification dtype)."""
    exact = reference.figures(model) if reference.dtype == torch.float64 else None
    dtypes.cast_in_place(model, dtype_for, hold=reference.dtype)
    written = reference.figures(model)
    return V.judge(
        reference,
        exact,
        written,
        dtypes.written_dtypes(model, dtype_for),
        applied.entries,
        exact_limit=options.exact_limit,
        atol=options.atol,
        rtol=options.rtol,
    )


def _train_choice(
    loaded: checkpoint.LoadedCheckpoint,
    options: ConvertOptions,
    record: metadata.Recorded | None = None,
    **how: Any,
) -> model_choice.ModelChoice:
    """What to build for a train checkpoint just read (`model_choice.choose`)."""
    at_hand = model_choice.PICKLED if loaded.module is not None else None
    return model_choice.choose(options, record, source=loaded.path.name, at_hand=at_hand, **how)


def _load_model(loaded: checkpoint.LoadedCheckpoint, train: Builder) -> nn.Module:
    """The train model chosen: the pickled module, or built around the loaded tensors."""
    if train.at_hand:
        return loaded.module.eval()
    return arch.build_loaded(
        train.spec, train.kwargs, loaded.state_dict, what=loaded.path.name, others=loaded.others
    )


def _empty(builder: Builder | None) -> nn.Module | None:
    """The deploy model chosen, on the meta device (None: the train model's own structure)."""
    return None if builder is None else arch.build_empty(builder.spec, builder.kwargs)


def metadata_for(
    result: Result,
    spec: str | None,
    kwargs: Mapping[str, Any],
    sha: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """A deploy file's metadata (`metadata.build`); the writer adds `tensors_sha256`, since
    only it sees the bytes written: `write_checkpoint(..., tensors_digest=True)`."""
    return metadata.build(
        torch_version=torch.__version__,
        arch=spec,
        arch_kwargs=kwargs,
        source_sha256=sha,
        plan=result.plan.record(),
        verification=_verification_record(result),
        options=options,
        params_before=result.params_before,
        params_after=result.params_after,
    )


def _verification_record(result: Result) -> dict[str, Any] | None:
    """What the file records of its checks: the figures, and how it reads in the train class."""
    if result.verification is None:
        return None
    names = None if result.convention is None else result.convention.to_dict()
    return {**result.verification.to_dict(), "convention": names}


@one_at_a_time
@takes_options()
def convert_file(
    input_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    dry_run: bool = False,
    before_writing: Callable[[Result], Any] | None = None,
    int8: Calibration | None = None,
    **keywords: Any,
) -> Result:
    """Read a train checkpoint, convert and verify it, write the deploy checkpoint atomically.

    `options` and/or keyword arguments naming `ConvertOptions` fields (`arch_spec=` for
    `arch`) say how. Nothing is written when verification fails (unless `force`), when `strict`
    and a norm could not be folded, or on `dry_run`. `before_writing(result)` runs once the
    conversion may be written, just before it is: what it raises (a failed ONNX check) leaves
    nothing written. `int8`: the INT8 readiness report too (`Result.int8`; see `convert`).
    """
    options = ConvertOptions.merged(options, keywords)
    input_path, output_path = Path(input_path), Path(output_path)
    out = checkpoint.check_output_path(output_path, inputs=[input_path])
    loaded = checkpoint.read_checkpoint(
        input_path, key=options.key, trust_pickle=options.trust_pickle
    )
    choice = _train_choice(loaded, options)
    if _same_layout(loaded, choice, out, options):
        return _convert_layout(loaded, choice, out, options, dry_run, before_writing)
    model = _load_model(loaded, choice.train)
    loaded.state_dict = None  # the model holds what it needs; let fused-away tensors go
    result = convert(model, options, deploy_model=_empty(choice.deploy), int8=int8)
    result.source = _source(loaded, choice)
    _check_outcome(result, options, loaded.path.name)
    if not dry_run and not result.noop:
        if before_writing is not None:
            before_writing(result)
        recorded = recorded_options(options)
        arch_spec, kwargs = choice.train.spec, choice.train.kwargs
        meta = metadata_for(result, arch_spec, kwargs, loaded.sha256, recorded)
        checkpoint.write_checkpoint(out, result.state_dict, meta, tensors_digest=True)
        result.written = True
    return result


def _source(
    loaded: checkpoint.LoadedCheckpoint, choice: model_choice.ModelChoice, **extra: Any
) -> dict:
    """Where the weights came from, and why each model was built as it was."""
    return {
        "path": str(loaded.path),
        "sha256": loaded.sha256,
        "key": loaded.source_key,
        "stripped_prefixes": list(loaded.stripped_prefixes),
        "arch": choice.train.spec,
        "models": choice.reasons(),
        **extra,
    }


def _check_outcome(result: Result, options: ConvertOptions, what: str) -> None:
    """Whether a conversion may be written: not already in deploy form (unless --allow-noop,
    which writes nothing either), --strict with nothing left unfolded, verification passed
    (unless --force). `what` names the model (a file, or a key of a pickled layout)."""
    if result.noop:
        if options.allow_noop:
            return
        raise BadInput(
            f"{shown(what)} is already in deploy form: no train-time blocks or conv-BN pairs to "
            "fold; nothing written (--allow-noop makes this exit 0)"
        )
    if options.strict and result.plan.warnings:
        first = result.plan.warnings[0]
        raise BadInput(
            f"--strict: {len(result.plan.warnings)} norm(s) or block(s) left unfolded in "
            f"{shown(what)}, first {first['path']}: {first['message']}"
        )
    if not result.passed and not options.force:
        failure = VerificationFailed(result.verification.failure_message())
        failure.result = result
        raise failure


def _same_layout(
    loaded: checkpoint.LoadedCheckpoint,
    choice: model_choice.ModelChoice,
    out: Path,
    options: ConvertOptions,
) -> bool:
    """Write the input's own layout back: a trusted pickled model (used as the train model)
    into a .pt/.pth output, unless --state-dict-only."""
    pickled = loaded.container is not None and choice.train.at_hand
    torch_file = out.suffix.lower() in (".pt", ".pth")
    return pickled and torch_file and not options.state_dict_only


def _convert_layout(
    loaded: checkpoint.LoadedCheckpoint,
    choice: model_choice.ModelChoice,
    out: Path,
    options: ConvertOptions,
    dry_run: bool,
    before_writing: Callable[[Result], Any] | None,
) -> Result:
    """Every model the pickled file holds converted and verified; the file written back in
    its layout (`layout.rewritten`), loaded back and checked before it is renamed into place.
    The result returned is the model --key (or the usual nesting) names; the others ride on it."""
    models = layout.models_in(loaded.container)
    loaded.state_dict = None  # the models hold what they need; let fused-away tensors go
    by_module: dict[int, Result] = {}
    for key, module in models.items():
        if id(module) not in by_module:
            result = convert(module.eval(), options, deploy_model=_empty(choice.deploy))
            result.source = _source(loaded, choice, key=key or None)
            by_module[id(module)] = result
    by_key = {key: by_module[id(module)] for key, module in models.items()}
    main_key = loaded.source_key or layout.WHOLE_FILE
    main = by_key[main_key]
    everything_noop = all(r.noop for r in by_key.values())
    if everything_noop:
        _check_outcome(main, options, loaded.path.name)
    for key, result in by_key.items():
        if not result.noop:  # a deploy-form EMA beside a train-form model is written as it is
            _check_outcome(result, options, _model_name(loaded, key))
    for result in by_module.values():
        if not result.noop:
            result.source["settled"] = layout.settle(
                result.model, _folded_norms(result.plan), _probe(result)
            )
    rewritten = layout.rewritten(
        loaded.container, {k: r.model for k, r in by_key.items()}, options.keep_training_state
    )
    main.layout = rewritten.entries
    main.others = {k: r for k, r in by_key.items() if r is not main}
    if not dry_run and not everything_noop:
        if before_writing is not None:
            before_writing(main)
        layout.write_checked(out, rewritten.container, lambda back: _loads_back(back, by_key))
        main.written = True
    return main


def _folded_norms(applied: Applied) -> list[str]:
    """The norms the conv -> BN pass folded (their slots now Identity)."""
    return [
        o.step.chain[-1]
        for o in applied.entries
        if o.rule == "conv_bn" and o.status == "fused" and len(o.step.chain) == 2
    ]


def _probe(result: Result) -> Tensor | None:
    """One of the verification inputs, when a block's own method ran (it may leave modules the
    forward no longer calls); None without verification."""
    if result.reference is None or not _ran_a_method(result.plan):
        return None
    return result.reference.inputs[0]


def _ran_a_method(applied: Applied) -> bool:
    return any(o.rule == "deploy_method" and o.status == "fused" for o in applied.entries)


def _model_name(loaded: checkpoint.LoadedCheckpoint, key: str) -> str:
    return loaded.path.name if key == layout.WHOLE_FILE else f"{loaded.path.name}[{key!r}]"


def _loads_back(container: Any, by_key: Mapping[str, Result]) -> None:
    """The file just written, loaded back: each model of the written class with exactly the
    written tensors and forwards, and (verified conversions whose forwards changed after the
    verification, or were rewritten) computing what the train model did, on one sample."""
    models = layout.models_in(container)
    for key, result in by_key.items():
        what = key or "the model"
        back = models.get(key)
        if back is None:
            raise BadInput(f"the written file holds no model under {key!r} once loaded back")
        layout.check_same_tensors(what, result.model, back)
        graphs = layout.check_same_forwards(what, result.model, back)
        verification, reference = result.verification, result.reference
        # Run only what tensors and forwards alone do not prove: a rewritten graph's forward
        # re-traced by torch, or modules `layout.settle` changed after verification.
        if reference is None or verification is None:
            continue
        if not (graphs or result.source.get("settled")):
            continue
        dtypes.hold_all_in(back, reference.dtype)
        # One sample proves the pickled forward is the verified one (all were judged already).
        figures = measure(V.run_model(back.eval(), reference.inputs[:1]), reference.outputs[:1])
        atol, rtol = verification.written_atol, verification.written_rtol
        if not all(f.passes(atol, rtol) for f in figures.values()):
            raise BadInput(
                f"{what}, pickled and loaded back, computes something else than the model "
                "verified (a forward that does not survive pickling); write a .safetensors "
                "file, or the state dict alone with --state-dict-only"
            )


def _deploy_structure(model: nn.Module, recorded_plan: PlanRecord | None = None) -> None:
    """Rewrite a train-form model into the deploy structure its conversion produced.

    The conversion's recorded plan says which steps were skipped (a deploy method that failed
    its check and was undone, say); those are skipped again rather than judged again.
    """
    blocks = recorded_plan.blocks if recorded_plan is not None else ()
    skipped = {
        (block.path, block.rule): block.reason or "skipped when converted"
        for block in blocks
        if block.status == "skipped"
    }
    left_out = recorded_plan.left_out if recorded_plan is not None else None
    engine.apply(model, engine.plan(model, leave_out=left_out), skip=skipped)


@one_at_a_time
def load_deploy(
    path: str | Path,
    model_or_arch: nn.Module | str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    *,
    deploy_arch: str | None = None,
    deploy_arch_kwargs: Mapping[str, Any] | None = None,
    trust_metadata: bool = False,
) -> nn.Module:
    """Rebuild the deploy structure (from a train-form model or an arch spec) and load `path`.

    The weights are loaded strictly. With no architecture given, the one recorded in the file's
    metadata is used if it is a built-in zoo name, or any spec with `trust_metadata=True`.
    With `deploy_arch` (or a file converted with one), that deploy model is built and the file
    loaded into it as it is.
    """
    module = model_or_arch if isinstance(model_or_arch, nn.Module) else None
    options = ConvertOptions(
        arch=None if module is not None else model_or_arch,
        arch_kwargs=arch_kwargs,
        deploy_arch=deploy_arch,
        deploy_arch_kwargs=deploy_arch_kwargs,
    )
    return load_deploy_with(path, options, module=module, trust_metadata=trust_metadata)


@one_at_a_time
def load_deploy_with(
    path: str | Path,
    options: ConvertOptions,
    *,
    module: nn.Module | None = None,
    trust_metadata: bool = False,
) -> nn.Module:
    """`load_deploy` with the model's and the deploy model's options as an options object
    (`--deploy-kwargs` included), `module` the train-form model if the caller has one."""
    state, meta = checkpoint.read_deploy(path)
    record, what = metadata.read(meta), Path(path).name
    at_hand = None if module is None else model_choice.GIVEN
    choice = model_choice.choose(
        options, record, what=what, at_hand=at_hand, trust_metadata=trust_metadata,
        train_needed=False,
    )  # fmt: skip
    if choice.deploy is not None:
        return _loaded_into(_empty(choice.deploy), state, what)
    recorded_plan = model_choice.recorded(record, "plan", what)
    if choice.train.at_hand:
        model = module.eval()
        _deploy_structure(model, recorded_plan)
        return _loaded_into(model, state, what)
    return arch.build_loaded(
        choice.train.spec,
        choice.train.kwargs,
        state,
        what=what,
        prepare=lambda model: _deploy_structure(model, recorded_plan),
    )


def _loaded_into(model: nn.Module, state: Mapping[str, Tensor], what: str) -> nn.Module:
    arch.check_fit(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@one_at_a_time
@takes_options("model", "deploy", "check")
def verify_files(
    train_path: str | Path,
    deploy_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    trust_metadata: bool = False,
    **keywords: Any,
) -> tuple[V.Verification, dict[str, str]]:
    """Compare a deploy checkpoint against the train checkpoint it came from.

    Two checks, on one model built once: its deploy tensors, recomputed from the train
    checkpoint, must equal the file's (within one ulp of the file's dtype), and the file's
    tensors loaded into it must compute what the train model computed (the written figure).
    Without `arch_spec`, the architecture recorded in the deploy file is used if it is a
    built-in zoo name (any spec with `trust_metadata`), else a trusted pickled train model.
    Options used: the model's and the check's (`ConvertOptions` groups "model", "check").
    """
    options = ConvertOptions.merged(options, keywords)
    input_shape, samples, seed = options.input_shape, options.samples, options.seed
    _check_two_files(Path(train_path), Path(deploy_path))
    state, meta, pickled = _read_deploy_file(Path(deploy_path), options)
    record, what = metadata.read(meta), Path(deploy_path).name
    key = options.key if options.key is not None else _recorded_key(record, what)
    loaded = checkpoint.read_checkpoint(train_path, key=key, trust_pickle=options.trust_pickle)
    choice = _train_choice(loaded, options, record, what=what, trust_metadata=trust_metadata)
    model = _load_model(loaded, choice.train)
    loaded.state_dict = None  # the model holds what it needs
    deploy_model = _empty(choice.deploy)
    kept = _train_tensors_for(deploy_model, model)
    shape = arch.input_shape_for(model, input_shape)
    keep = _kept_by(deploy_model, model, input_shape)
    # The passes the conversion was made without, as the file records them: a record that
    # lies about them makes the recomputed tensors differ from the file's.
    recorded_plan = model_choice.recorded(record, "plan", what)
    if recorded_plan is not None:
        left_out = recorded_plan.left_out
    else:  # a pickled file records nothing: the form convert writes by default
        left_out = deploy_form.passes_left_out(model, False, deploy_model is not None)
    plan = engine.plan(model, keep=keep, leave_out=left_out)
    # As `convert` does by default: the whole model in float64, references before the rewrite.
    dtypes.hold_all_in(model, torch.float64)
    reference = V.take_reference(
        model, shape, samples, seed, torch.float64, _extents(model, plan), bool(input_shape)
    )
    train_keys = set(model.state_dict())
    applied = engine.apply(model, plan)
    _check_deploy_is_converted(train_keys, set(model.state_dict()), set(state), what)
    if pickled:  # written in its own layout: settled for its framework's loader, as convert does
        probe = reference.inputs[0] if _ran_a_method(applied) else None
        layout.settle(model, _folded_norms(applied), probe)
    if deploy_model is not None:
        _fill_deploy(deploy_model, model, kept, lambda _key: torch.float64)
        model = deploy_model
    tensors = V.compare_tensors(model.state_dict(), state)
    written = None
    if tensors.fits:
        _load_in_float64(model, state)
        with V.reporting_out_of_memory(shape):
            written = reference.figures(model)
    file_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    verification = V.Verification(
        input_shape=reference.shape,
        samples=samples,
        seed=seed,
        dtype="float64",
        exact=None,
        written=written,
        exact_limit=EXACT_LIMIT,
        tensors=tensors,
        **V.written_tolerances(file_dtypes, options.atol, options.rtol),
    )
    notes = _verify_notes(record, loaded.sha256, applied, what)
    if not applied.entries:
        notes["train"] = (
            f"{Path(train_path).name} holds no train-time blocks (it is already in deploy "
            "form): the check compared two deploy-form files"
        )
    return verification, notes | _key_note(loaded, what, options.key is None and key is not None)


def _read_deploy_file(
    path: Path, options: ConvertOptions
) -> tuple[dict[str, Tensor], dict[str, str], bool]:
    """A deploy file's tensors, metadata, and whether it pickles its model (a same-layout
    output of `convert --trust-pickle`: read with --trust-pickle, under --key)."""
    if path.suffix.lower() == ".safetensors" or not options.trust_pickle:
        return (*checkpoint.read_deploy(path), False)
    loaded = checkpoint.read_checkpoint(path, key=options.key, trust_pickle=True)
    return loaded.state_dict, {}, loaded.module is not None


def _check_two_files(train_path: Path, deploy_path: Path) -> None:
    """`verify` compares a train checkpoint with the file convert wrote from it: not a file
    with itself."""
    same = train_path.resolve() == deploy_path.resolve()
    if not same and train_path.exists() and deploy_path.exists():
        same = train_path.samefile(deploy_path)
    if same:
        raise BadInput(
            f"TRAIN and DEPLOY are the same file ({shown(train_path.name)}): verify compares a "
            "train checkpoint with the deploy file `repconv convert` wrote from it"
        )


def _check_deploy_is_converted(
    train_keys: set[str], converted_keys: set[str], file_keys: set[str], what: str
) -> None:
    """A DEPLOY holding the train model's own names, where the conversion changes them, is a
    train checkpoint: said as such, not as a list of differing keys."""
    if file_keys == train_keys and converted_keys != train_keys:
        raise BadInput(
            f"{shown(what)} is a train-form checkpoint (its tensors have the train model's "
            "names, nothing in it is fused): give DEPLOY as the file `repconv convert` wrote"
        )


def _key_note(loaded: checkpoint.LoadedCheckpoint, what: str, recorded: bool) -> dict[str, str]:
    """Where the weights were read in the train file, and whether by the recorded --key."""
    read_from = source_note(loaded.path.name, loaded.source_key, loaded.stripped_prefixes)
    if not read_from:
        return {}
    return {"key": read_from + (f" (the --key {what} records)" if recorded else "")}


def _recorded_key(record: metadata.Recorded, what: str) -> str | None:
    """The --key the deploy file's conversion was given, to read its train file the same way."""
    options = model_choice.recorded(record, "options", what) or {}
    key = options.get("key")
    return key if isinstance(key, str) else None


def source_note(name: str, key: str | None, stripped: Sequence[str]) -> str | None:
    """Where in the train file `name` the weights were read (a nested key, wrapper prefixes
    stripped), or None when they were the file itself. The file's words escaped."""
    parts = []
    if key is not None:
        parts.append(f"under key {shown(repr(key))}")
    if stripped:
        parts.append("without the prefix " + " and ".join(map(repr, stripped)))
    if not parts:
        return None
    return f"read the weights of {shown(name)} " + ", ".join(parts)


def _load_in_float64(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The file's exact values, held in float64 so the run adds no rounding of its own."""
    widened = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(widened, strict=True, assign=True)


def _verify_notes(
    record: metadata.Recorded, source_sha: str, applied: Applied, what: str
) -> dict[str, str]:
    notes = {}
    recorded = record.source_sha256
    if recorded and recorded != source_sha:
        notes["source"] = "the deploy file records a different source checkpoint (sha256 differs)"
    plan_note = _recorded_plan_note(record, applied.plan, what)
    if plan_note:
        notes["plan"] = plan_note
    return notes


def _recorded_plan_note(record: metadata.Recorded, plan: Plan, what: str) -> str | None:
    """A note when the blocks (path, rule) the file records are not the recomputed ones; a
    plan that cannot be read is unreadable metadata, bad input like any other field."""
    recorded_plan = model_choice.recorded(record, "plan", what)
    if recorded_plan is None:
        return None
    recorded = {(b.path, b.rule) for b in recorded_plan.blocks}
    recomputed = {(s.path, s.rule) for s in plan.entries}
    if recorded == recomputed:
        return None
    parts = []
    for label, blocks in (
        ("only in the file", recorded - recomputed),
        ("only recomputed", recomputed - recorded),
    ):
        if blocks:
            # The file's paths and rules are its writer's words: escaped for the terminal.
            named = ", ".join(f"{shown(p or '<root>')} ({shown(r)})" for p, r in sorted(blocks)[:3])
            parts.append(f"{len(blocks)} {label}: {named}{', ...' if len(blocks) > 3 else ''}")
    return (
        f"the plan recorded in {what} differs from the recomputed one ({'; '.join(parts)}); "
        "the file may come from another repconv version or another --arch"
    )


@one_at_a_time
@takes_options("model")
def inspect_file(
    input_path: str | Path, options: ConvertOptions | None = None, **keywords: Any
) -> tuple[Applied, int, int]:
    """What converting a checkpoint would do (fused in memory only, nothing written).

    Returns the plan with every entry's outcome and the parameter counts before and after.
    Of the options, the model's (arch, arch_kwargs, key, trust_pickle) apply. `inspect_int8`
    adds the INT8 report.
    """
    applied, before, after, _ = inspect_int8(input_path, options, **keywords)
    return applied, before, after


@one_at_a_time
@takes_options("model")
def inspect_int8(
    input_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    int8: Calibration | None = None,
    **keywords: Any,
) -> tuple[Applied, int, int, Int8Report | None]:
    """`inspect_file`, and with `int8` the INT8 readiness report of the model fused in memory
    (on the calibration inputs, else on seeded random ones: `input_shape` is the model's)."""
    options = ConvertOptions.merged(options, keywords)
    key, trust_pickle = options.key, options.trust_pickle
    loaded = checkpoint.read_checkpoint(input_path, key=key, trust_pickle=trust_pickle)
    model = _load_model(loaded, _train_choice(loaded, options).train).eval()
    before = param_count(model)
    # the plan `convert` makes by default (the library's own deploy form where it has one)
    plan = engine.plan(model, leave_out=deploy_form.passes_left_out(model, False, False))
    attributions = _attributions(model, plan) if int8 is not None else {}
    applied = engine.apply(model, plan)
    readiness = None
    if int8 is not None:
        readiness = _int8_report(model, applied, attributions, int8, None, options)
    return applied, before, param_count(model), readiness


@dataclass(frozen=True)
class RecordedConversion:
    """What a deploy file written by repconv records of its conversion (its header alone)."""

    plan: PlanRecord
    params_before: int
    params_after: int
    verification: dict[str, Any] | None  # None: written without verification

    @property
    def convention(self) -> dict[str, Any] | None:
        """How the file reads in the train class by the conv-BN convention, as recorded (None:
        not checked, e.g. a file filled into a deploy model of the user's)."""
        return None if self.verification is None else self.verification.get("convention")

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            **self.plan.to_json(),
            "verification": self.verification,
            "convention": self.convention,
        }


def recorded_conversion(path: str | Path) -> RecordedConversion | None:
    """The conversion a deploy file records, or None if it is not one repconv wrote (a train
    checkpoint). Read from the header only: no tensor is loaded, no code runs."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        fields = files.read_safetensors_metadata(path)
    except (OSError, ValueError):
        return None  # not readable as one: the train-checkpoint path says why
    if fields.get(metadata.FORMAT_KEY) != metadata.FORMAT:
        return None
    record, what = metadata.read(fields), path.name
    plan = model_choice.recorded(record, "plan", what)
    if plan is None:
        raise BadInput(f"{shown(what)}: records no plan")
    before, after = model_choice.recorded(record, "params", what)
    return RecordedConversion(
        plan, before, after, model_choice.recorded(record, "verification", what)
    )


@one_at_a_time
@takes_options("model", "check", omit=("samples", "seed", "atol", "rtol"))
def bench_file(
    input_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    deploy_path: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    runs: int = 10,
    warmup: int = 3,
    **keywords: Any,
):
    """Train model (eval) against deploy model: latency per batch size, params and MACs.

    The deploy model is `deploy_path` if given, else the train checkpoint converted in memory.
    Of the options, the model's (arch, arch_kwargs, key, trust_pickle) and input_shape apply.
    """
    options = ConvertOptions.merged(options, keywords)
    key, trust_pickle, input_shape = options.key, options.trust_pickle, options.input_shape
    from repconv import bench

    loaded = checkpoint.read_checkpoint(input_path, key=key, trust_pickle=trust_pickle)
    chosen = _train_choice(loaded, options).train
    train = _load_model(loaded, chosen)
    arch_spec, kwargs = chosen.spec, chosen.kwargs
    if chosen.at_hand:
        # A trusted pickled model: a second copy of it gives the deploy structure.
        twin = checkpoint.read_checkpoint(input_path, key=key, trust_pickle=True).module
        if deploy_path is not None:
            deploy = load_deploy(deploy_path, twin)
        else:
            deploy = twin
            engine.convert_model(deploy.eval())
    elif deploy_path is not None:
        deploy = load_deploy(deploy_path, arch_spec, kwargs)
    else:
        deploy = arch.build_loaded(arch_spec, kwargs, loaded.state_dict, what=loaded.path.name)
        engine.convert_model(deploy)
    shape = arch.input_shape_for(train, input_shape)
    # One batch-1 pass first, so an input the model rejects is reported as verification does.
    dtype = next((p.dtype for p in train.parameters()), torch.float32)
    V.check_inputs_fit(shape, 2 * max(batch_sizes, default=1), dtype)  # as bench.compare does
    V.reference_outputs(train, [torch.zeros((1, *shape), dtype=dtype)], shape, bool(input_shape))
    with V.reporting_out_of_memory(shape):
        return bench.compare(train, deploy, shape, batch_sizes, runs, warmup)
