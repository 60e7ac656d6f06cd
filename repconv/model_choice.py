"""Which models a workflow builds, and why: the one place that decides it.

A workflow reads its files, then asks `choose`: the train model (a builder spec with keyword
arguments, or a module already at hand) and the deploy model (the user's own builder, or None:
the train model's deploy structure as repconv rewrites it). Each answer carries a short reason.

The trust rule lives here and only here. A deploy file's metadata is data: a spec it records
would import a module or a file and call what it names with keyword arguments from the file,
that is, run code chosen by whoever wrote the file. So a recorded spec is built without asking
only when it is a built-in zoo name, and any other one only when the user said
`--trust-metadata`. A refusal names the spec (escaped) and suggests no command line: the user
reads what the spec is and passes it as their own option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repconv import metadata
from repconv.errors import BadInput
from repconv.options import ConvertOptions
from repconv.terminal import shown
from repconv.zoo import registry as zoo

# What a module at hand is (`choose(at_hand=...)`): it is used as the train model.
PICKLED = "the model the checkpoint pickles (--trust-pickle)"
GIVEN = "the model passed in"
OWN_DEPLOY_STRUCTURE = "the train model's own, rewritten by repconv"
DEPLOY_FLAG = "--deploy-arch (deploy_arch= in Python)"
SPEC_FORMS = "a built-in name, package.module:callable or path/to/file.py:callable"


@dataclass(frozen=True)
class Builder:
    """A model to build: `spec` called with `kwargs`. `spec` None: the module at hand."""

    spec: str | None
    kwargs: dict[str, Any]
    why: str

    @property
    def at_hand(self) -> bool:
        return self.spec is None


@dataclass(frozen=True)
class ModelChoice:
    """What to build. `train` is None only when it is not needed (a deploy file loaded into a
    deploy model); `deploy` None is the train model's own deploy structure."""

    train: Builder | None
    deploy: Builder | None

    def reasons(self) -> dict[str, str]:
        """Why each model is what it is, for a report."""
        reasons = {} if self.train is None else {"train": self.train.why}
        reasons["deploy"] = OWN_DEPLOY_STRUCTURE if self.deploy is None else self.deploy.why
        return reasons


def choose(
    options: ConvertOptions,
    record: metadata.Recorded | None = None,
    *,
    what: str = "the deploy file",
    source: str | None = None,
    at_hand: str | None = None,
    trust_metadata: bool = False,
    train_needed: bool = True,
) -> ModelChoice:
    """The models to build from `options`, a deploy file's `record` (named `what`) and trust.

    `source`: the train checkpoint's name, when there is one (it is what lacks an --arch).
    `at_hand`: what the module already there is (`PICKLED`, `GIVEN`), when there is one.
    `train_needed` False (loading a deploy file): the train model is chosen only when the
    deploy model needs it or there is no deploy model. The options were checked when made
    (`--deploy-kwargs` comes with `--arch`). BadInput when nothing names a train model, when a
    record field needed is damaged, or when the file names a spec it may not run.
    """
    reading = _Reading(record, what, trust_metadata)
    deploy = _deploy_given(options, reading)
    recorded_deploy = None if deploy is not None else reading.option("deploy_arch", str)
    train = None
    if train_needed or (deploy is None and recorded_deploy is None):
        train = _train(options, reading, source, at_hand)
    if deploy is None:
        deploy = _deploy_recorded(reading, recorded_deploy, train)
    return ModelChoice(train, deploy)


def recorded(record: metadata.Recorded, name: str, what: str) -> Any:
    """A field of a deploy file's record (`Recorded`'s property `name`); a damaged one is bad
    input naming the file."""
    try:
        return getattr(record, name)
    except metadata.MetadataError as exc:
        raise BadInput(f"{shown(what)}: {exc}") from None


@dataclass(frozen=True)
class _Reading:
    """A deploy file's record as a choice reads it (no record: a train checkpoint alone)."""

    record: metadata.Recorded | None
    what: str
    trust_metadata: bool

    @property
    def arch(self) -> str | None:
        return None if self.record is None else self.record.arch

    def kwargs_for(self, spec: str) -> dict[str, Any]:
        """The recorded `arch_kwargs` when `spec` is the recorded architecture; they mean
        nothing to another one."""
        if self.record is None or spec != self.record.arch:
            return {}
        return dict(recorded(self.record, "arch_kwargs", self.what))

    def option(self, name: str, kind: type) -> Any:
        """One option the file was converted with (None if not recorded)."""
        written = {} if self.record is None else recorded(self.record, "options", self.what)
        value = (written or {}).get(name)
        if value is None or isinstance(value, kind):
            return value
        expected = "a string" if kind is str else "a JSON object"
        raise BadInput(f"{shown(self.what)}: metadata 'options' {name} is not {expected}")

    def trusted(self, spec: str, named: str, flag: str) -> str:
        """Why a spec the file records may be built; else BadInput: `named` (the file naming
        the spec), the rule, and the option (`flag`) the user may pass it as.

        The advice is never a command line: one holding the file's words would run them.
        """
        if zoo.get_entry(spec) is not None:
            return "recorded in the file (a built-in zoo name)"
        if self.trust_metadata:
            return "recorded in the file (--trust-metadata)"
        raise BadInput(
            f"{named}; repconv does not run code a file names: read what it is, and if you "
            f"trust it, pass it yourself as {flag} or add --trust-metadata"
        )


def _train(
    options: ConvertOptions, reading: _Reading, source: str | None, at_hand: str | None
) -> Builder:
    """--arch, else the module at hand, else the architecture the file records (if trusted)."""
    if options.arch is not None:
        if options.arch_kwargs is not None or not reading.kwargs_for(options.arch):
            return Builder(options.arch, dict(options.arch_kwargs or {}), "--arch")
        kwargs = reading.kwargs_for(options.arch)
        return Builder(options.arch, kwargs, "--arch, with the arch_kwargs the file records")
    if at_hand is not None:
        return Builder(None, {}, at_hand)
    spec = reading.arch
    if spec is None:
        if source is not None:
            raise BadInput(
                f"{shown(source)} holds a state dict; say which model it belongs to with --arch "
                f"({SPEC_FORMS})"
            )
        raise BadInput(f"{shown(reading.what)} records no architecture; pass one (--arch)")
    kwargs = reading.kwargs_for(spec)
    named = f"{shown(reading.what)} names the architecture '{shown(spec)}' in its metadata"
    why = reading.trusted(spec, named, "--arch")
    if options.arch_kwargs is not None:
        return Builder(spec, dict(options.arch_kwargs), f"{why}, with --arch-kwargs")
    return Builder(spec, kwargs, why)


def _deploy_given(options: ConvertOptions, reading: _Reading) -> Builder | None:
    """The deploy model the options name: --deploy-arch, or --arch with --deploy-kwargs."""
    if options.deploy_arch is not None:
        return Builder(options.deploy_arch, dict(options.deploy_arch_kwargs or {}), "--deploy-arch")
    if options.deploy_kwargs is None:
        return None
    base = options.arch_kwargs
    if base is None:
        base = reading.kwargs_for(options.arch)
    kwargs = {**base, **options.deploy_kwargs}
    return Builder(options.arch, kwargs, "--deploy-kwargs on top of --arch")


def _deploy_recorded(reading: _Reading, spec: str | None, train: Builder | None) -> Builder | None:
    """The deploy model the file was written for (`spec`, its recorded --deploy-arch), if any.

    A recorded --deploy-kwargs goes on top of the train builder; with a module at hand, on top
    of the recorded architecture, which then needs trust as --arch does.
    """
    what = shown(reading.what)
    if spec is not None:
        kwargs = reading.option("deploy_arch_kwargs", dict) or {}
        named = f"{what} was written for the deploy model '{shown(spec)}'"
        return Builder(spec, kwargs, reading.trusted(spec, named, DEPLOY_FLAG))
    extra = reading.option("deploy_kwargs", dict)
    if extra is None:
        return None
    if train is not None and not train.at_hand:
        why = f"the file's deploy_kwargs on top of the train builder ({train.why})"
        return Builder(train.spec, {**train.kwargs, **extra}, why)
    spec = reading.arch
    if spec is None:
        raise BadInput(
            f"{what} was written with --deploy-kwargs but records no architecture; "
            "pass the deploy model as --deploy-arch"
        )
    named = f"{what} was written for the deploy model '{shown(spec)}' with deploy_kwargs"
    why = reading.trusted(spec, named, DEPLOY_FLAG)
    return Builder(spec, {**reading.kwargs_for(spec), **extra}, f"{why}, with its deploy_kwargs")
