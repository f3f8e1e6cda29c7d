"""Exceptions with messages meant for users (the CLI prints them without a traceback)."""


class UltraRefinerError(Exception):
    """Base class for errors caused by bad input or configuration."""


class BadInputError(UltraRefinerError):
    """A file or directory given by the user cannot be used; the message names it and the problem."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
