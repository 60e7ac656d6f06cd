"""The public workflows: convert a model or a checkpoint file, verify a deploy file, inspect.

Data moves forward only: the checkpoint is read once, the model is built once (around the loaded
tensors), reference outputs are taken before the in-place rewrite, and the deploy tensors are
written once, atomically.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv import __version__, arch, checkpoint, engine, pages
from repconv import verification as V
from repconv.engine import Plan
from repconv.errors import BadInput, VerificationFailed
from repconv.options import ConvertOptions, recorded_options
from repconv.rules.base import Rule, param_count
from repconv.zoo import registry as zoo

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class Result:
    """A conversion: the deploy model, its plan, its verification, and the tensors to write."""

    model: nn.Module
    plan: Plan
    verification: V.Verification | None
    state_dict: dict[str, Tensor]
    params_before: int
    params_after: int
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "plan": self.plan.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


def _dtype_of_keys(model: nn.Module) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}


def _output_dtypes(
    original: Mapping[str, torch.dtype], the_plan: Plan
) -> Callable[[str], torch.dtype]:
    """Which dtype each deploy key is written in: its own, or that of the block it came from."""
    floating = [d for d in original.values() if d.is_floating_point]
    fallback = max(set(floating), key=floating.count) if floating else torch.float32
    by_block: dict[str, torch.dtype] = {}
    for entry in the_plan.entries:
        prefix = f"{entry.path}." if entry.path else ""
        for key, dtype in original.items():
            if key.startswith(prefix) and dtype.is_floating_point:
                by_block[entry.path] = dtype
                break

    def dtype_for(key: str) -> torch.dtype:
        if key in original:
            return original[key]
        owners = [p for p in by_block if not p or key.startswith(f"{p}.")]
        return by_block[max(owners, key=len)] if owners else fallback

    return dtype_for


def _holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Every `narrow` value is a `wide` value (finer steps, a range at least as large)."""
    w, n = torch.finfo(wide), torch.finfo(narrow)
    return w.eps <= n.eps and w.max >= n.max and w.smallest_normal <= n.smallest_normal


def _check_holds_weights(verify_dtype: torch.dtype, dtypes) -> None:
    """The weights are held in the verification dtype while they are fused: never round them."""
    lost = sorted(
        {str(d).removeprefix("torch.") for d in dtypes if d.is_floating_point}
        - {
            str(d).removeprefix("torch.")
            for d in DTYPES.values()
            if _holds_exactly(verify_dtype, d)
        }
    )
    if lost:
        name = str(verify_dtype).removeprefix("torch.")
        raise BadInput(
            f"--verify-dtype {name} cannot hold the checkpoint's {', '.join(lost)} weights "
            "exactly, and they are fused while held in it; use float64 (the default) or the "
            "checkpoint's own dtype"
        )


def _cast_in_place(model: nn.Module, dtype_for: Callable[[str], torch.dtype], hold=None) -> None:
    """Round every floating tensor to the dtype it is written in; hold it in `hold` if given.

    With `hold=float64` the model computes with exactly the values the file will contain. Each
    replaced tensor's pages go back as soon as its copy exists, so a memory-mapped model is never
    resident in both dtypes at once.
    """
    with pages.PageReleaser() as releaser:
        for module_path, module in model.named_modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None or not tensor.is_floating_point():
                        continue
                    key = f"{module_path}.{name}" if module_path else name
                    value = tensor.detach().to(dtype_for(key))
                    if hold is not None:
                        value = value.to(hold)
                    if value is tensor or value.data_ptr() == tensor.data_ptr():
                        continue  # already in that dtype
                    replaced = tensor.detach()
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = value
                    else:
                        store[name] = value
                    releaser.release([replaced])


def convert(
    model: nn.Module,
    options: ConvertOptions | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    **keywords: Any,
) -> Result:
    """Convert `model` in place into its deploy form and verify it against itself before.

    The check is set by `options` (a `ConvertOptions`) and/or keyword arguments naming its
    fields: input_shape, samples, seed, verify, verify_dtype, exact_limit, atol, rtol.
    The model's floating tensors are held in `verify_dtype` during the check (float64 by
    default) and the returned `state_dict` is in the model's own dtypes. No copy of the model
    is made: reference outputs are taken before the rewrite.
    """
    options = ConvertOptions.merged(options, keywords)
    input_shape, samples, seed = options.input_shape, options.samples, options.seed
    verify, verify_dtype = options.verify, options.verify_dtype
    exact_limit, atol, rtol = options.exact_limit, options.atol, options.rtol
    if isinstance(verify_dtype, str):
        verify_dtype = DTYPES[verify_dtype]
    if samples < 1:
        raise BadInput("--samples must be at least 1")
    model.eval()
    original = _dtype_of_keys(model)
    if verify:
        _check_holds_weights(verify_dtype, original.values())
    params_before = param_count(model)
    the_plan = engine.plan(model, rules)
    dtype_for = _output_dtypes(original, the_plan)
    verification = None
    if verify:
        shape = list(input_shape) if input_shape else list(arch.default_input_shape(model))
        _cast_in_place(model, lambda _key: verify_dtype)
        inputs = V.make_inputs(shape, samples, seed, verify_dtype)
        paths = [e.path for e in the_plan.entries]
        try:
            with V.reporting_out_of_memory(shape), V.recording_input_shapes(model, paths) as shapes:
                references = V.run(model, inputs)
        except RuntimeError as exc:
            raise BadInput(
                f"the model cannot run on inputs of shape {shape}: {_first_line(exc)} "
                "(set --input-shape)"
            ) from None
        engine.apply(model, the_plan, probe_shapes=shapes, seed=seed)
        exact = None
        if verify_dtype == torch.float64:
            exact = V.measure(V.run(model, inputs), references)
        _cast_in_place(model, dtype_for, hold=verify_dtype)
        written = V.measure(V.run(model, inputs), references)
        out_dtypes = {dtype_for(k) for k, v in model.state_dict().items() if v.is_floating_point()}
        verification = V.Verification(
            input_shape=shape,
            samples=samples,
            seed=seed,
            dtype=str(verify_dtype).removeprefix("torch."),
            exact=exact,
            written=written,
            exact_limit=exact_limit,
            **V.written_tolerances(out_dtypes, atol, rtol),
        )
        limit_for_blocks = exact_limit if exact is not None else verification.written_rtol
        verification.suspects = [
            {"path": e.path, "rule": e.rule, "block_error": e.block_error}
            for e in sorted(the_plan.entries, key=lambda e: -(e.block_error or 0.0))
            if e.block_error is not None and not e.block_error <= limit_for_blocks
        ]
    else:
        engine.apply(model, the_plan)
    _cast_in_place(model, dtype_for)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return Result(model, the_plan, verification, state, params_before, param_count(model))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_model(
    loaded: checkpoint.LoadedCheckpoint, spec: str | None, kwargs: Mapping[str, Any]
) -> nn.Module:
    if spec is None:
        if loaded.module is not None:
            return loaded.module.eval()
        raise BadInput(
            f"{loaded.path.name} holds a state dict; say which model it belongs to with --arch "
            "(a built-in name, package.module:callable or path/to/file.py:callable)"
        )
    return arch.build_loaded(spec, kwargs, loaded.state_dict, what=loaded.path.name)


def metadata_for(
    result: Result,
    spec: str | None,
    kwargs: Mapping[str, Any],
    sha: str,
    options: Mapping[str, Any] | None = None,
) -> dict:
    """A deploy file's metadata. The writer adds one key more, `tensors_sha256` (the sha256 of
    the data section), since only it sees the bytes written: `write_checkpoint(...,
    tensors_digest=True)`."""
    return {
        "format": checkpoint.METADATA_FORMAT,
        "version": __version__,
        "torch": torch.__version__,
        "arch": spec or "",
        "arch_kwargs": json.dumps(dict(kwargs), sort_keys=True),
        "source_sha256": sha,
        "plan": json.dumps(result.plan.to_dict()),
        "verification": json.dumps(
            None if result.verification is None else result.verification.to_dict()
        ),
        "options": json.dumps(dict(options or {}), sort_keys=True),
        "params_before": str(result.params_before),
        "params_after": str(result.params_after),
    }


def convert_file(
    input_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    dry_run: bool = False,
    **keywords: Any,
) -> Result:
    """Read a train checkpoint, convert and verify it, write the deploy checkpoint atomically.

    `options` and/or keyword arguments naming `ConvertOptions` fields (`arch_spec=` for
    `arch`) say how. Nothing is written when verification fails (unless `force`), when `strict`
    and a norm could not be folded, or on `dry_run`.
    """
    options = ConvertOptions.merged(options, keywords)
    arch_spec, kwargs, key = options.arch, dict(options.arch_kwargs or {}), options.key
    trust_pickle, strict, force = options.trust_pickle, options.strict, options.force
    input_path, output_path = Path(input_path), Path(output_path)
    out = checkpoint.check_output_path(output_path, inputs=[input_path])
    loaded = checkpoint.read_checkpoint(input_path, key=key, trust_pickle=trust_pickle)
    model = _load_model(loaded, arch_spec, kwargs)
    loaded.state_dict = None  # the model holds what it needs; let fused-away tensors go
    result = convert(model, options)
    result.source = {
        "path": str(input_path),
        "sha256": loaded.sha256,
        "key": loaded.source_key,
        "stripped_prefixes": list(loaded.stripped_prefixes),
        "arch": arch_spec,
    }
    if strict and result.plan.warnings:
        first = result.plan.warnings[0]
        raise BadInput(
            f"--strict: {len(result.plan.warnings)} norm(s) or block(s) left unfolded, "
            f"first {first['path']}: {first['message']}"
        )
    if not result.passed and not force:
        failure = VerificationFailed(result.verification.failure_message())
        failure.result = result
        raise failure
    if not dry_run:
        recorded = recorded_options(options)
        meta = metadata_for(result, arch_spec, kwargs, loaded.sha256, recorded)
        checkpoint.write_checkpoint(out, result.state_dict, meta, tensors_digest=True)
    return result


def _deploy_structure(model: nn.Module) -> None:
    engine.apply(model, engine.plan(model))


def recorded_architecture(
    meta: Mapping[str, str], what: str, *, trust_metadata: bool = False
) -> tuple[str | None, dict[str, Any]]:
    """The architecture a deploy file's metadata names, if it may be built without asking.

    Metadata is data: a spec that imports a module or a file (and calls what it names with
    kwargs from the file) would run code chosen by whoever wrote the file, so only built-in zoo
    names are taken unless the user said `trust_metadata` (`--trust-metadata`).
    """
    spec = meta.get("arch") or None
    kwargs = checkpoint.metadata_json(meta, "arch_kwargs", what, {}) if spec else {}
    if spec is None or trust_metadata or zoo.get_entry(spec) is not None:
        return spec, kwargs
    typed = f"--arch {shlex.quote(spec)}"
    if kwargs:
        typed += f" --arch-kwargs {shlex.quote(json.dumps(kwargs, sort_keys=True))}"
    raise BadInput(
        f"{what} names the architecture {spec!r} in its metadata; repconv does not run code a "
        f"file names: if you trust it, pass it yourself ({typed}) or add --trust-metadata"
    )


def _recorded_kwargs_for(spec: str | None, meta: Mapping[str, str], what: str) -> dict[str, Any]:
    """The recorded `arch_kwargs` when `spec` is the recorded architecture; they mean nothing
    to another one."""
    if spec is None or spec != meta.get("arch"):
        return {}
    return checkpoint.metadata_json(meta, "arch_kwargs", what, {})


def load_deploy(
    path: str | Path,
    model_or_arch: nn.Module | str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    *,
    trust_metadata: bool = False,
) -> nn.Module:
    """Rebuild the deploy structure (from a train-form model or an arch spec) and load `path`.

    The weights are loaded strictly. With no architecture given, the one recorded in the file's
    metadata is used if it is a built-in zoo name, or any spec with `trust_metadata=True`.
    """
    state, meta = checkpoint.read_deploy(path)
    what = Path(path).name
    if isinstance(model_or_arch, nn.Module):
        model = model_or_arch.eval()
        _deploy_structure(model)
        arch.check_fit(model, state, what)
        model.load_state_dict(state, strict=True, assign=True)
        return model
    spec = model_or_arch
    if spec is None:
        spec, recorded_kwargs = recorded_architecture(meta, what, trust_metadata=trust_metadata)
        arch_kwargs = recorded_kwargs if arch_kwargs is None else arch_kwargs
    if not spec:
        raise BadInput(f"{what} records no architecture; pass one (--arch)")
    if arch_kwargs is None:
        arch_kwargs = _recorded_kwargs_for(spec, meta, what)
    return arch.build_loaded(spec, arch_kwargs, state, what=what, prepare=_deploy_structure)


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
    arch_spec, arch_kwargs, key = options.arch, options.arch_kwargs, options.key
    input_shape, samples, seed = options.input_shape, options.samples, options.seed
    trust_pickle, atol, rtol = options.trust_pickle, options.atol, options.rtol
    state, meta = checkpoint.read_deploy(deploy_path)
    what = Path(deploy_path).name
    loaded = checkpoint.read_checkpoint(train_path, key=key, trust_pickle=trust_pickle)
    spec = arch_spec
    if spec is None and loaded.module is None:
        spec, recorded_kwargs = recorded_architecture(meta, what, trust_metadata=trust_metadata)
        arch_kwargs = recorded_kwargs if arch_kwargs is None else arch_kwargs
    if arch_kwargs is None:
        arch_kwargs = _recorded_kwargs_for(spec, meta, what)
    model = _load_model(loaded, spec, arch_kwargs)
    loaded.state_dict = None  # the model holds what it needs
    shape = list(input_shape) if input_shape else list(arch.default_input_shape(model))
    if samples < 1:
        raise BadInput("--samples must be at least 1")
    # As `convert` does by default: the whole model in float64, references before the rewrite.
    _cast_in_place(model, lambda _key: torch.float64)
    inputs = V.make_inputs(shape, samples, seed, torch.float64)
    references = _reference_outputs(model, inputs, shape)
    the_plan = engine.apply(model, engine.plan(model))
    tensors = V.compare_tensors(model.state_dict(), state)
    written = None
    if tensors.fits:
        _load_in_float64(model, state)
        with V.reporting_out_of_memory(shape):
            written = V.measure(V.run(model, inputs), references)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    verification = V.Verification(
        input_shape=shape,
        samples=samples,
        seed=seed,
        dtype="float64",
        exact=None,
        written=written,
        exact_limit=V.EXACT_LIMIT,
        tensors=tensors,
        **V.written_tolerances(dtypes, atol, rtol),
    )
    return verification, _verify_notes(meta, loaded.sha256, the_plan, what)


def _reference_outputs(model: nn.Module, inputs: Sequence[Tensor], shape: Sequence[int]) -> list:
    try:
        with V.reporting_out_of_memory(shape):
            return V.run(model, inputs)
    except RuntimeError as exc:
        raise BadInput(
            f"the model cannot run on inputs of shape {list(shape)}: {_first_line(exc)} "
            "(set --input-shape)"
        ) from None


def _load_in_float64(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The file's exact values, held in float64 so the run adds no rounding of its own."""
    widened = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(widened, strict=True, assign=True)


def _verify_notes(
    meta: Mapping[str, str], source_sha: str, the_plan: Plan, what: str
) -> dict[str, str]:
    notes = {}
    recorded = meta.get("source_sha256")
    if recorded and recorded != source_sha:
        notes["source"] = "the deploy file records a different source checkpoint (sha256 differs)"
    plan_note = _recorded_plan_note(meta.get("plan"), the_plan, what)
    if plan_note:
        notes["plan"] = plan_note
    return notes


def _recorded_plan_note(text: str | None, the_plan: Plan, what: str) -> str | None:
    """A note when the blocks (path, rule) the file records are not the recomputed ones."""
    if not text:
        return None
    try:
        recorded = {(b["path"], b["rule"]) for b in json.loads(text)["blocks"]}
    except (ValueError, TypeError, KeyError):
        # Only a note depends on it; the tensors themselves are checked either way.
        return f"{what}'s recorded plan is not readable"
    recomputed = {(e.path, e.rule) for e in the_plan.entries}
    if recorded == recomputed:
        return None
    parts = []
    for label, blocks in (
        ("only in the file", recorded - recomputed),
        ("only recomputed", recomputed - recorded),
    ):
        if blocks:
            shown = ", ".join(f"{p or '<root>'} ({r})" for p, r in sorted(blocks)[:3])
            parts.append(f"{len(blocks)} {label}: {shown}{', ...' if len(blocks) > 3 else ''}")
    return (
        f"the plan recorded in {what} differs from the recomputed one ({'; '.join(parts)}); "
        "the file may come from another repconv version or another --arch"
    )


def inspect_file(
    input_path: str | Path, options: ConvertOptions | None = None, **keywords: Any
) -> tuple[Plan, int, int]:
    """What converting a checkpoint would do (fused in memory only, nothing written).

    Returns the plan with every entry's outcome and the parameter counts before and after.
    Of the options, the model's (arch, arch_kwargs, key, trust_pickle) apply.
    """
    options = ConvertOptions.merged(options, keywords)
    arch_spec, arch_kwargs = options.arch, options.arch_kwargs
    key, trust_pickle = options.key, options.trust_pickle
    loaded = checkpoint.read_checkpoint(input_path, key=key, trust_pickle=trust_pickle)
    model = _load_model(loaded, arch_spec, dict(arch_kwargs or {}))
    before = param_count(model)
    the_plan = engine.apply(model, engine.plan(model))
    return the_plan, before, param_count(model)


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
    arch_spec, arch_kwargs = options.arch, options.arch_kwargs
    key, trust_pickle, input_shape = options.key, options.trust_pickle, options.input_shape
    from repconv import bench

    kwargs = dict(arch_kwargs or {})
    loaded = checkpoint.read_checkpoint(input_path, key=key, trust_pickle=trust_pickle)
    train = _load_model(loaded, arch_spec, kwargs)
    if loaded.module is not None and arch_spec is None:
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
    shape = list(input_shape) if input_shape else list(arch.default_input_shape(train))
    with V.reporting_out_of_memory(shape):
        return bench.compare(train, deploy, shape, batch_sizes, runs, warmup)
