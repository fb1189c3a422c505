"""The error type for problems the user can fix (bad input, wrong flags, missing files), and warnings.

Entry points catch it, print its one-line message after `error:` and exit with status 1; any
other exception is a bug and keeps its traceback. A warning (`warn`) is one line after `warning:`
on stderr, for something the run can go on with but the user should know.
"""

import sys


class UserError(Exception):
    """A problem with the input or the command line; the message names the case or file and the fix."""


def warn(message: str) -> None:
    """Print one `warning: ...` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
