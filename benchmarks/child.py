"""One measured process for the benchmark suite: `convert ...`, `floor CKPT OUT` or
`release NAME CKPT OUT` (the RepVGG release's own route, for RepVGG models).

Prints one JSON line: peak RSS and RSS after imports, in MiB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from repconv.batch.worker import status_mib  # torch-free: /proc/self/status only


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "release":  # the RepVGG release's convert.py route (release_route.py)
        import release_route

        after_imports = status_mib("VmRSS")
        release_route.convert(args[0], Path(args[1]), Path(args[2]))
        code = 0
    elif mode == "floor":
        from repconv import checkpoint  # same imports as repconv itself: torch, safetensors

        after_imports = status_mib("VmRSS")
        loaded = checkpoint.read_checkpoint(args[0])
        checkpoint.write_checkpoint(args[1], loaded.state_dict, {})
        code = 0
    else:
        if mode == "convert":  # the CLI loads torch lazily; count it as the runtime
            import repconv.pipeline  # noqa: F401
        from repconv.cli import main as cli

        after_imports = status_mib("VmRSS")
        try:
            cli([mode, *args], standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    # VmHWM belongs to this process image; getrusage's maxrss survives exec and would report
    # the parent's peak when that was larger.
    peak = status_mib("VmHWM")
    print(json.dumps({"code": code, "rss_after_imports": after_imports, "peak_rss": peak}))


if __name__ == "__main__":
    main()
