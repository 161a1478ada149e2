"""Errors a user can act on; the CLI prints their message without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file, row or key and what would be right."""
