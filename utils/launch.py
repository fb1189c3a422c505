"""How the wrappers in `scripts/` run main.py: print the command, then run it as an argument list."""

from __future__ import annotations

import subprocess


def run_printed(command: list[str]) -> int:
    """Print `command` (so a user can copy and edit it), run it without a shell and return its exit status."""
    print(" ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode
