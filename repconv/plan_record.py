"""The recorded plan: what a conversion did to each block, as a typed record.

Torch-free, so that `repconv batch`'s parent can read it back from a deploy file. This module is
the only writer of the plan the metadata and `--json` hold (`to_json`, `to_text`) and the only
reader of it (`from_json`, which checks every field's type: a file is data, and a record that
says something else is refused as a whole rather than half read). The JSON keeps its layout
(key order included) from before this record existed, so files written earlier read back and
equal conversions still give equal bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

from repconv.terminal import shown

BlockStatus = Literal["planned", "fused", "skipped"]
STATUSES: tuple[str, ...] = ("planned", "fused", "skipped")


class PlanRecordError(ValueError):
    """A recorded plan that does not hold what a plan holds; the message says where."""


@dataclass(frozen=True)
class BlockRecord:
    """One block (or conv -> norm pair) of a plan and how it went."""

    path: str
    rule: str
    family: str
    structure: str
    params_before: int
    params_after: int | None = None
    kernel_shape: tuple[int, ...] | None = None
    status: BlockStatus = "planned"
    reason: str | None = None
    block_error: float | None = None
    norm_path: str | None = None

    def __post_init__(self) -> None:
        # As recorded: a list in JSON, and no shape (None) rather than an empty one.
        shape = tuple(self.kernel_shape) if self.kernel_shape else None
        object.__setattr__(self, "kernel_shape", shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rule": self.rule,
            "family": self.family,
            "structure": self.structure,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "kernel_shape": list(self.kernel_shape) if self.kernel_shape else None,
            "status": self.status,
            "reason": self.reason,
            "block_error": self.block_error,
            "norm_path": self.norm_path,
        }

    @classmethod
    def from_json(cls, value: Any, where: str = "block") -> BlockRecord:
        item = _object(value, where)
        status = _text(item, "status", where)
        if status not in STATUSES:
            raise PlanRecordError(f"{where}.status is {status!r}, not one of {STATUSES}")
        shape = _optional(item, "kernel_shape", where, _integers)
        return cls(
            path=_text(item, "path", where),
            rule=_text(item, "rule", where),
            family=_text(item, "family", where),
            structure=_text(item, "structure", where),
            params_before=_integer(_present(item, "params_before", where), where, "params_before"),
            params_after=_optional(item, "params_after", where, _integer),
            kernel_shape=shape,
            status=cast(BlockStatus, status),
            reason=_optional(item, "reason", where, _string),
            block_error=_optional(item, "block_error", where, _number),
            norm_path=_optional(item, "norm_path", where, _string),
        )


@dataclass(frozen=True)
class WarningRecord:
    """Something left unfolded: where, and why."""

    path: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}

    @classmethod
    def from_json(cls, value: Any, where: str = "warning") -> WarningRecord:
        item = _object(value, where)
        return cls(_text(item, "path", where), _text(item, "message", where))


@dataclass(frozen=True)
class PlanRecord:
    """A plan as recorded: its blocks in the order of fusing, fused blocks counted per rule (in
    the order the rules first fused one), and what was left unfolded."""

    blocks: tuple[BlockRecord, ...] = ()
    fused_by_rule: Mapping[str, int] = field(default_factory=dict)
    warnings: tuple[WarningRecord, ...] = ()
    # The passes the plan was made without, each with why (`engine.plan(leave_out=...)`); a
    # rebuild of the deploy structure leaves them out too. Absent in files of older releases.
    left_out: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen all the way down: a record read from a file is not edited by its readers.
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "fused_by_rule", MappingProxyType(dict(self.fused_by_rule)))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "left_out", MappingProxyType(dict(self.left_out)))

    def form(self) -> dict[str, Any]:
        """Whether the model this plan is of holds train-time blocks: `form` "train" (with
        how many blocks, by family, and how many norms or blocks are left unfolded) or
        "deploy" (nothing to fold, nothing left unfolded)."""
        families: dict[str, int] = {}
        for block in self.blocks:
            families[block.family] = families.get(block.family, 0) + 1
        # A norm kept live on purpose (a pass left out, `left_out`) is part of the deploy form.
        unfolded = [
            w for w in self.warnings if not any(why in w.message for why in self.left_out.values())
        ]
        form = "train" if self.blocks or unfolded else "deploy"
        return {
            "form": form,
            "train_blocks": len(self.blocks),
            "families": families,
            "unfolded": len(unfolded),
        }

    def to_json(self) -> dict[str, Any]:
        written = {
            "blocks": [b.to_json() for b in self.blocks],
            "fused_by_rule": dict(self.fused_by_rule),
            "warnings": [w.to_json() for w in self.warnings],
        }
        if self.left_out:  # only then: a plan made with every pass reads as it always did
            written["left_out"] = dict(self.left_out)
        return written

    def to_text(self) -> str:
        """The plan as the deploy metadata holds it."""
        return json.dumps(self.to_json())

    @classmethod
    def from_json(cls, value: Any) -> PlanRecord:
        """The record a parsed JSON value holds; `PlanRecordError` (a ValueError) names the
        first field that is not what a plan holds."""
        plan = _object(value, "plan")
        blocks = _list(_present(plan, "blocks", "plan"), "plan.blocks")
        warnings = _list(_present(plan, "warnings", "plan"), "plan.warnings")
        counts = _object(_present(plan, "fused_by_rule", "plan"), "plan.fused_by_rule")
        left_out = _object(plan.get("left_out", {}), "plan.left_out")
        return cls(
            blocks=tuple(
                BlockRecord.from_json(b, f"plan.blocks[{i}]") for i, b in enumerate(blocks)
            ),
            fused_by_rule={
                rule: _integer(n, "plan.fused_by_rule", shown(rule)) for rule, n in counts.items()
            },
            warnings=tuple(
                WarningRecord.from_json(w, f"plan.warnings[{i}]") for i, w in enumerate(warnings)
            ),
            left_out={
                name: _string(why, "plan.left_out", shown(name)) for name, why in left_out.items()
            },
        )


# Checks of one parsed JSON value each; `where` says which field, for the message (a name from
# the file in it is escaped: messages reach a terminal).


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PlanRecordError(f"{where} is not a JSON object")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise PlanRecordError(f"{where} is not a JSON list")
    return value


def _present(item: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in item:
        raise PlanRecordError(f"{where} has no {key!r}")
    return item[key]


def _text(item: Mapping[str, Any], key: str, where: str) -> str:
    return _string(_present(item, key, where), where, key)


def _optional(item: Mapping[str, Any], key: str, where: str, check: Any) -> Any:
    value = _present(item, key, where)
    return None if value is None else check(value, where, key)


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise PlanRecordError(f"{where}.{key} is not a string")
    return value


def _integer(value: Any, where: str, key: str) -> int:
    # JSON's true/false parse as bools, which Python counts as ints: not counts.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanRecordError(f"{where}.{key} is not an integer")
    return value


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanRecordError(f"{where}.{key} is not a number")
    return value


def _integers(value: Any, where: str, key: str) -> list[int]:
    return [_integer(v, where, key) for v in _list(value, f"{where}.{key}")]
