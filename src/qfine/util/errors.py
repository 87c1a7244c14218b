"""User-facing errors.

A :class:`QfineError` is a mistake in what the user gave us (a missing file, a malformed line, an
unknown module name). The CLI prints its message alone and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class QfineError(Exception):
    """A user error: one clear message naming the file, line or field at fault."""
