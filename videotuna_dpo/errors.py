"""Errors a user can act on; the CLI prints their message without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file, row or key and what would be right."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (library errors often go on for paragraphs)."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]
