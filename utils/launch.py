"""How the wrappers in `scripts/` run main.py: print the command, then run it as an argument list."""

from __future__ import annotations

import shlex
import subprocess


def run_printed(command: list[str]) -> int:
    """Print `command`, quoted for a shell so that it can be copied and edited, then run it without a shell
    and return its exit status."""
    print(shlex.join(command), flush=True)
    return subprocess.run(command, check=False).returncode
