"""Map a fused train model's tensors onto the user's own deploy model, whatever its names.

The conversion leaves the train model in a deploy form whose names are repconv's (or the block's
own); the user's deploy class may call the fused conv otherwise (`rbr_reparam`, `reparam_conv`,
`lkb_reparam`...), collapse a Sequential to its conv, or keep dead train branches. Each deploy
tensor is found, in this order:

1. the fused model's tensor at the same path, if its shape is the same;
2. the train checkpoint's tensor at the same path (a dead branch the deploy form keeps), when
   it fills the whole module;
3. for what is left, module by module: the fused module holding tensors of the same names and
   shapes, nearest in the tree (inside the deploy module's parent), if exactly one is nearest.

Anything left on either side, or a tie, is an error naming the paths: never a guess. Pure
bookkeeping on names and shapes; no torch computation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from repconv.errors import BadInput
from repconv.paths import within

Shape = tuple[int, ...]
SHOWN = 5


@dataclass(frozen=True)
class Source:
    """Where a deploy tensor comes from: `fused` (the converted model) or `train` (the
    checkpoint, for a dead branch), at `key`."""

    side: str
    key: str


@dataclass
class Placement:
    """Every deploy key's source, or what could not be placed."""

    sources: dict[str, Source] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)  # deploy keys no tensor fits
    unused: list[str] = field(default_factory=list)  # fused keys no deploy key takes
    ambiguous: list[tuple[str, list[str]]] = field(default_factory=list)


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _shared_depth(a: str, b: str) -> int:
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def _signature(keys: Sequence[str], shapes: Mapping[str, Shape]) -> tuple:
    return tuple(sorted((_leaf(k), shapes[k]) for k in keys))


def _by_module(keys: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_module(key), []).append(key)
    return groups


def plan_mapping(
    deploy: Mapping[str, Shape], fused: Mapping[str, Shape], train: Mapping[str, Shape]
) -> Placement:
    """Which tensor fills each deploy key (see the module docstring for the order)."""
    result = Placement()
    taken: set[str] = set()
    for key, shape in deploy.items():
        if fused.get(key) == shape:
            result.sources[key] = Source("fused", key)
            taken.add(key)
        elif key not in fused and train.get(key) == shape:
            result.sources[key] = Source("train", key)
    left = [k for k in deploy if k not in result.sources]
    # A module the train checkpoint only half fills is not a dead branch but a fused conv that
    # kept a train name (UniRepLKNet's `lk_origin` gains a bias): it is matched whole.
    unfinished = {_module(k) for k in left}
    for key, source in list(result.sources.items()):
        if source.side == "train" and _module(key) in unfinished:
            del result.sources[key]
            left.append(key)
    spare = {k for k in fused if k not in taken}
    _match_modules(result, left, spare, deploy, fused)
    result.unused = sorted(k for k in spare if k not in {s.key for s in result.sources.values()})
    return result


def _match_modules(
    result: Placement,
    left: list[str],
    spare: set[str],
    deploy: Mapping[str, Shape],
    fused: Mapping[str, Shape],
) -> None:
    """Whole modules at once: a conv's weight and bias move together, so a weight can never
    be paired with another conv's bias. Each deploy module takes the nearest fused module with
    the same tensors (the most path segments shared); a deploy module whose nearest is unique
    and no other's nearest takes it, which removes it from the others' choices, until none is
    decided so (a second head of the same shape is left one candidate once the first, nearer
    by its path, took its own). Two left at the same distance, or one wanted by two deploy
    modules alike, is ambiguous: never a guess."""
    candidates = _by_module(sorted(spare))
    signatures = {m: _signature(keys, fused) for m, keys in candidates.items()}
    wanted = _by_module(left)
    fits: dict[str, list[str]] = {}
    for module, keys in sorted(wanted.items()):
        want = _signature(keys, deploy)
        scope = _module(module) if module else ""
        found = [m for m, sig in signatures.items() if sig == want and within(m, scope)]
        if found:
            fits[module] = found
        else:
            result.unplaced += sorted(keys)
    chosen, undecided = _decide(fits)
    for module, fused_module in chosen.items():
        by_leaf = {_leaf(k): k for k in candidates[fused_module]}
        for key in wanted[module]:
            result.sources[key] = Source("fused", by_leaf[_leaf(key)])
    for module, left_fits in undecided.items():
        best = _nearest(module, left_fits)
        rivals = [m for m, c in undecided.items() if best and best[0] in _nearest(m, c)]
        if not best:  # what fitted it went to deploy modules nearer to it
            result.unplaced += sorted(wanted[module])
        elif len(best) > 1:
            result.ambiguous.append((module, sorted(best)))
        else:
            result.ambiguous.append((best[0], sorted(rivals)))


def _nearest(module: str, fits: Sequence[str]) -> list[str]:
    if not fits:
        return []
    best = max(_shared_depth(m, module) for m in fits)
    return [m for m in fits if _shared_depth(m, module) == best]


def _decide(fits: Mapping[str, list[str]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Deploy module -> fused module, where the paths decide: repeatedly, a deploy module whose
    nearest candidate is unique takes it if, of the deploy modules it is nearest to, it is the
    one nearest to it; what it takes leaves the others' choices. Also the modules left
    undecided, with the candidates left to them."""
    chosen: dict[str, str] = {}
    open_fits = {m: list(c) for m, c in fits.items()}
    while True:
        nearest = {m: _nearest(m, c) for m, c in open_fits.items()}
        claimants: dict[str, list[str]] = {}
        for module, best in nearest.items():
            for candidate in best:
                claimants.setdefault(candidate, []).append(module)
        decided = {
            module: best[0]
            for module, best in nearest.items()
            if len(best) == 1 and _nearest(best[0], claimants[best[0]]) == [module]
        }
        if not decided:
            return chosen, open_fits
        chosen.update(decided)
        taken = set(decided.values())
        open_fits = {
            m: [c for c in cands if c not in taken]
            for m, cands in open_fits.items()
            if m not in decided
        }


def kept_modules(train: Mapping[str, Shape], deploy: Mapping[str, Shape]) -> list[str]:
    """The modules the deploy model keeps as the train model has them: at the same path, with
    tensors of the same names and shapes (a live conv + BN pair, a post-sum BN, a layer scale).
    Only the outermost of them; modules holding no tensor are left out (they constrain nothing).

    The conversion takes these from the train checkpoint as they are, and no fusion crosses
    them: the deploy model decides what is fused.
    """

    train_under, deploy_under = _tensors_under(train), _tensors_under(deploy)
    kept: list[str] = []
    for module in sorted(train_under):  # parents sort before their children
        if any(within(module, outer) for outer in kept):
            continue
        if train_under[module] == deploy_under.get(module):
            kept.append(module)
    return kept


def _tensors_under(shapes: Mapping[str, Shape]) -> dict[str, dict[str, Shape]]:
    """For every module path (prefix of a key, "" the root): its tensors, by relative name."""
    found: dict[str, dict[str, Shape]] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        for n in range(len(parts)):
            found.setdefault(".".join(parts[:n]), {})[".".join(parts[n:])] = shape
    return found


def _few(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    more = len(paths) - SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


def require_complete(
    mapping: Placement,
    what: str,
    deploy: Mapping[str, Shape] | None = None,
    fused: Mapping[str, Shape] | None = None,
) -> None:
    """BadInput (one line, naming paths) unless every deploy and fused tensor found its place.

    Given both shape maps, a key both sides have in different shapes is named with its shapes.
    """
    if mapping.ambiguous:
        one, others = mapping.ambiguous[0]
        raise BadInput(
            f"{what} is ambiguous: `{one}` matches {_few(others)} alike (same tensors, same "
            "distance); name them apart or convert without a deploy model"
        )
    problems = []
    if deploy is not None and fused is not None:
        clashes = [k for k in mapping.unplaced if k in fused and fused[k] != deploy[k]]
        if clashes:
            shown = ", ".join(
                f"{k} {list(deploy[k])} (converted: {list(fused[k])})" for k in clashes[:SHOWN]
            )
            problems.append(f"shapes differ: {shown}")
    if mapping.unplaced:
        problems.append(f"the deploy model expects {_few(mapping.unplaced)}, which nothing fills")
    if mapping.unused:
        problems.append(f"the converted model's {_few(mapping.unused)} have no place in it")
    if problems:
        raise BadInput(f"{what} does not fit the converted model: " + "; ".join(problems))
