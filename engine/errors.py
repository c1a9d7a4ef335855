"""Errors that the CLI maps to exit codes (docs/cli.md: 2 for bad input, 1 for a run failure)."""


class InputError(Exception):
    """Bad input, path or config: the command exits 2 and writes nothing.

    The message names what was missing or wrong, what was there instead, and the fix.
    """
