"""Errors the user can fix, told apart from bugs so the CLI can answer them in one line.

A :class:`UserError` (a bad or missing file, a bad row, an option out of range, a model that is not on
disk) carries a message that names what is wrong, where, and the fix. ``medrl`` prints that message alone
on stderr and exits 2; any other exception is a bug and keeps its traceback. ``MEDRL_DEBUG=1`` shows the
traceback of user errors too.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what, where (file, row, option) and how."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work (out of range, contradicting another option)."""


class NonFiniteError(UserError):
    """Training produced a NaN or inf loss, weight or probability; the message names the step and the likely
    cause (most often a learning rate far too high)."""


# Operating-system errors that mean a path the user named is missing, of the wrong kind or not allowed.
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """True for errors the user can fix: :class:`UserError` and the path errors of :data:`PATH_ERRORS`."""
    return isinstance(exc, (UserError, *PATH_ERRORS))


def user_error_in(exc: BaseException) -> BaseException | None:
    """The user error ``exc`` is or was raised from, else None.

    Libraries re-raise: jsonargparse turns an option group's :class:`ConfigError` into a ``ValueError``
    about union subtypes, ``raise ... from`` the original. The original is the message worth showing.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if is_user_error(current):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a path error names its file)."""
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc.strerror or ""):
        text = f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
