"""Write the train checkpoints a batch config names, for the zoo models it converts.

    python benchmarks/zoo_checkpoints.py configs/zoo.toml

Existing files are kept, so re-running costs nothing. Each checkpoint has random BN statistics
(seeded by its position in the config), so every fusion has real work to do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from repconv.batch import load_config
from repconv.zoo import registry
from repconv.zoo.checkpoints import save_train_checkpoint


def write_missing(config_path: str | Path) -> list[Path]:
    """The checkpoints of `config_path`'s entries, written where missing."""
    paths = []
    for seed, job in enumerate(load_config(config_path).jobs):
        path = Path(job.input)
        if registry.get_entry(job.arch or "") is None:
            raise SystemExit(f"{job.name}: {job.arch!r} is not a zoo model; cannot make it")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_train_checkpoint(job.arch, path, randomize_bn=True, seed=seed)
            print(f"wrote {path}", file=sys.stderr)
        paths.append(path)
    return paths


if __name__ == "__main__":
    write_missing(sys.argv[1] if len(sys.argv) > 1 else "configs/zoo.toml")
