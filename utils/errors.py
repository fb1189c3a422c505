"""The error type for problems the user can fix (bad input, wrong flags, missing files).

Entry points catch it, print its one-line message after `error:` and exit with status 1; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the input or the command line; the message names the case or file and the fix."""
