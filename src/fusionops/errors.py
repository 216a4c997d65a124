"""Errors a person can act on: the CLI prints their message (no traceback) and exits with their code."""


class UserError(Exception):
    """A mistake in the input or the setup, explained with what to do about it."""

    exit_code = 1


class DataError(UserError):
    """The data (manifest, images, labels) is not usable as it is."""

    exit_code = 2
