"""Errors the factory reports to users: each names the problem and the fix."""


class FactoryError(Exception):
    """A problem with user input or environment; the CLI prints it and exits non-zero."""

    exit_code = 2


class GateFailure(FactoryError):
    """A build finished but at least one parity gate failed."""

    exit_code = 1
