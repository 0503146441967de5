"""Errors a user can cause: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""
