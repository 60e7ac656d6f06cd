"""The registry of passes, in the fixed order the engine runs them (see `rules.base.Pass`).

At each module, top-down, the first block rule whose `match` accepts it wins and its subtree is not
searched further. Then every module outside the matched blocks that still holds a batch norm and
has a deploy method of its own is handed to the deploy-method fallback, children first (what each
method leaves goes on to the conv -> BN pass at once). Last, the conv -> BN fold runs over whatever
is left, found by data flow. Third-party rules are
added with `register_rule` or through the `repconv.rules` entry-point group (each entry point names
a Rule object or a zero-argument callable returning one or a list of them).

A new built-in pass is one module plus one line here: in `BUILTIN_RULES` for a block rule, in
`LATER_PASSES` for a pass that runs after the block rules. The order and the registered rules
are held by a `Registry`; the module's functions use its default one (`DEFAULT`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib.metadata import entry_points

from repconv.rules import acb, convbn, dataflow, dbb, deploy_method, repvgg
from repconv.rules.base import Pass, Rule

ENTRY_POINT_GROUP = "repconv.rules"

BUILTIN_RULES: tuple[Rule, ...] = (repvgg.RULE, dbb.RULE, acb.RULE)
# After the block rules (and any registered ones), in this order.
LATER_PASSES: tuple[Pass, ...] = (deploy_method.PASS, dataflow.PASS, convbn.PASS)


class Registry:
    """The passes in the order the engine runs them, and the rules registered at run time.

    Registering is safe across threads (one lock guards the lists and the one-time loading of
    the entry points); readers get a copy of the order as it was when they asked.
    """

    def __init__(
        self,
        builtin: Sequence[Rule] = BUILTIN_RULES,
        later: Sequence[Pass] = LATER_PASSES,
        *,
        entry_points_group: str | None = ENTRY_POINT_GROUP,
    ):
        self._builtin = list(builtin)
        self._registered: list[Rule] = []
        self._later = list(later)
        self._group = entry_points_group
        self._lock = threading.RLock()  # loading entry points registers their rules

    def register(self, rule: Rule, *, before: str | None = None) -> Rule:
        """Add a block rule; it is tried after the built-in ones unless `before` names a rule.

        The contract a rule must keep is written once, on the public `repconv.register_rule`.
        """
        if not isinstance(rule, Rule):
            raise TypeError(f"expected a repconv Rule, got {type(rule).__name__}")
        with self._lock:
            if any(r.name == rule.name for r in self.block_rules()):
                raise ValueError(f"a rule named {rule.name!r} is already registered")
            if before is None:
                self._registered.append(rule)
            elif (found := self._place_of(before)) is not None:
                rules, index = found
                rules.insert(index, rule)
            else:
                raise ValueError(f"no rule named {before!r}")
        return rule

    def unregister(self, name: str) -> None:
        with self._lock:
            found = self._place_of(name)
            if found is None:
                raise ValueError(f"no rule named {name!r}")
            rules, index = found
            del rules[index]

    def _place_of(self, name: str) -> tuple[list[Rule], int] | None:
        for rules in (self._registered, self._builtin):
            names = [r.name for r in rules]
            if name in names:
                return rules, names.index(name)
        return None

    def _load_entry_points(self) -> None:
        """Register the rules of the entry-point group, once (later calls find it done)."""
        group, self._group = self._group, None
        if group is None:
            return
        for ep in entry_points(group=group):
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, Rule):
                loaded = loaded()
            for rule in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
                self.register(rule)

    def block_rules(self) -> list[Rule]:
        """Block rules in the order the engine tries them."""
        with self._lock:
            self._load_entry_points()
            return [*self._builtin, *self._registered]

    def passes(self, rules: Sequence[Rule] | None = None) -> list[Pass]:
        """Every pass in the order the engine runs them: the block rules (or `rules`), then
        the rest."""
        with self._lock:
            return [*(self.block_rules() if rules is None else rules), *self._later]

    def describe(self) -> list[dict[str, str]]:
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
            for i, p in enumerate(self.passes(), start=1)
        ]


DEFAULT = Registry()
"""The registry the engine and the public functions use."""


def register_rule(rule: Rule, *, before: str | None = None) -> Rule:
    """`Registry.register` on the default registry."""
    return DEFAULT.register(rule, before=before)


def unregister_rule(name: str) -> None:
    DEFAULT.unregister(name)


def block_rules() -> list[Rule]:
    return DEFAULT.block_rules()


def passes(rules: Sequence[Rule] | None = None) -> list[Pass]:
    return DEFAULT.passes(rules)


def describe() -> list[dict[str, str]]:
    return DEFAULT.describe()
