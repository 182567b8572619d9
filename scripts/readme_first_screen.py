"""Run the README's first screen exactly as written: the commands of its first ```bash block.

CI (``.ci/run``) calls this on a clean checkout, so the README's two set-up commands
(``make demo``, ``make test``) are what CI runs and cannot drift from the code. Each command
runs from the repository root with ``bash -c``; the script stops at the first failure with its
exit status and prints the wall time of each command (the README quotes these times).

    python3 scripts/readme_first_screen.py [--only demo]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def first_screen_commands(readme: str) -> list[str]:
    """The command lines of the README's first ```bash block (comments after ``#`` dropped)."""
    m = re.search(r"```bash\n(.*?)```", readme, re.S)
    if m is None:
        raise ValueError("README.md has no ```bash block")
    cmds = []
    for line in m.group(1).splitlines():
        cmd = line.split("#", 1)[0].strip()
        if cmd:
            cmds.append(cmd)
    if not cmds:
        raise ValueError("the README's first ```bash block holds no command")
    return cmds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only the commands containing this text (e.g. demo)")
    args = ap.parse_args(argv)
    cmds = first_screen_commands((REPO / "README.md").read_text(encoding="utf-8"))
    if args.only:
        cmds = [c for c in cmds if args.only in c]
    for cmd in cmds:
        print(f"README first screen: {cmd}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(["bash", "-c", cmd], cwd=REPO).returncode
        print(f"README first screen: {cmd!r} exited {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
