"""Exceptions with messages meant for users (the CLI prints them without a traceback)."""


class UltraRefinerError(Exception):
    """Base class for errors caused by bad input or configuration."""


class BadInputError(UltraRefinerError):
    """A file or directory given by the user cannot be used; the message names it and the problem."""

    def __init__(self, path: object, reason: str | None = None):
        if reason is None:  # the whole message: torch re-raises a DataLoader worker's error as exc_type(message)
            super().__init__(str(path))
            self.path, self.reason = "", str(path)
            return
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class BadOptionError(UltraRefinerError, ValueError):
    """An option's value cannot be used (e.g. a fold that the datalist does not have); the message names the option,
    the value and what would be valid. A ValueError too, for callers that catch those."""


class CheckpointMismatchError(BadInputError):
    """A checkpoint was written by another run (phase, dataset, fold or network) than the one about to use it; the
    message names the file and both identities (``found``: what the file records, ``expected``: this run)."""

    def __init__(self, path: object, reason: str, found: dict, expected: dict):
        super().__init__(path, reason)
        self.found, self.expected = dict(found), dict(expected)


class UnknownOptionError(UltraRefinerError):
    """Options of a bundle run that no config declares; ``problems`` holds one line per option, with suggestions."""

    def __init__(self, problems: list[str], context: str = ""):
        head = f"unknown option{'s' if len(problems) > 1 else ''}{f' for {context}' if context else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems
