"""The one error class of the bench harness: a user-facing problem, printed as one line."""


class BenchError(Exception):
    """A bad flag, file or server answer; the CLI prints its message alone and exits non-zero."""
