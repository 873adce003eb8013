"""The one exception type that reaches users as a single line.

Raised for bad input and unmet preconditions: what is wrong, where, and how to fix it.
The CLI prints the message and exits non-zero; bugs stay ordinary exceptions.
"""


class CompressError(Exception):
    """A user-facing error whose message is one complete line."""


class Interrupted(CompressError):
    """Ctrl-C during a long run; the message says what was kept and how to continue."""
