"""User-facing errors: every message names the problem and the fix."""


class QuantkitError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""
