"""Errors a user can fix: the command-line tools print them in one line."""


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it in one line, exit status 2."""
