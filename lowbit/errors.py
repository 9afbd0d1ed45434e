"""User-facing errors: one clear line, no traceback, a non-zero exit."""


class LowbitError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""
