"""The registry of passes, in the fixed order the engine runs them (see `rules.base.Pass`).

At each module, top-down, the first block rule whose `match` accepts it wins and its subtree is not
searched further. Then every module outside the matched blocks that still holds a batch norm and
has a deploy method of its own is handed to the deploy-method fallback, children first (what each
method leaves goes on to the conv -> BN pass at once). Last, the conv -> BN fold runs over whatever
is left, found by data flow. Third-party rules are
added with `register_rule` or through the `repconv.rules` entry-point group (each entry point names
a Rule object or a zero-argument callable returning one or a list of them).

A new built-in pass is one module plus one line here: in `_BUILTIN` for a block rule, in
`_LATER_PASSES` for a pass that runs after the block rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points

from repconv.rules import acb, convbn, dataflow, dbb, deploy_method, repvgg
from repconv.rules.base import Pass, Rule

ENTRY_POINT_GROUP = "repconv.rules"

_BUILTIN: list[Rule] = [repvgg.RULE, dbb.RULE, acb.RULE]
# After the block rules (and any registered ones), in this order.
_LATER_PASSES: list[Pass] = [deploy_method.PASS, dataflow.PASS, convbn.PASS]
_registered: list[Rule] = []
_entry_points_loaded = False


def register_rule(rule: Rule, *, before: str | None = None) -> Rule:
    """Add a block rule; it is tried after the built-in ones unless `before` names a rule.

    The contract a rule must keep is written once, on the public `repconv.register_rule`.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"expected a repconv Rule, got {type(rule).__name__}")
    if any(r.name == rule.name for r in block_rules()):
        raise ValueError(f"a rule named {rule.name!r} is already registered")
    if before is None:
        _registered.append(rule)
    else:
        names = [r.name for r in _registered]
        if before in names:
            _registered.insert(names.index(before), rule)
        elif any(r.name == before for r in _BUILTIN):
            _BUILTIN.insert([r.name for r in _BUILTIN].index(before), rule)
        else:
            raise ValueError(f"no rule named {before!r}")
    return rule


def unregister_rule(name: str) -> None:
    for rules in (_registered, _BUILTIN):
        for r in list(rules):
            if r.name == name:
                rules.remove(r)
                return
    raise ValueError(f"no rule named {name!r}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if callable(loaded) and not isinstance(loaded, Rule):
            loaded = loaded()
        for rule in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
            register_rule(rule)


def block_rules() -> list[Rule]:
    """Block rules in the order the engine tries them."""
    _load_entry_points()
    return [*_BUILTIN, *_registered]


def passes(rules: Sequence[Rule] | None = None) -> list[Pass]:
    """Every pass in the order the engine runs them: the block rules (or `rules`), then the rest."""
    return [*(block_rules() if rules is None else rules), *_LATER_PASSES]


def describe() -> list[dict[str, str]]:
    """Every rule and pass, in the order they apply, for `repconv rules`."""
    return [
        {
            "order": str(i),
            "name": p.name,
            "family": p.family,
            "kind": p.kind,
            "matches": p.summary,
            "deploy_form": p.deploy_form,
        }
        for i, p in enumerate(passes(), start=1)
    ]
