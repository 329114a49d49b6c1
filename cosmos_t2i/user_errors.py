"""A user's mistake ends a script with one line, `error: ...` saying the fix, and exit code 2; no traceback.

Tracebacks stay for bugs, and for `--debug`. What counts as the user's: a `UserError` (raised where the check is
made, as a subclass of the built-in error it stands for, so callers catching FileNotFoundError etc. still do), and
the file-system errors about a path the user gave (missing, existing, not permitted), whose messages name it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys


class UserError(Exception):
    exit_code = 2


class MissingInput(UserError, FileNotFoundError):
    pass


class ExistingOutput(UserError, FileExistsError):
    pass


class BadValue(UserError, ValueError):
    pass


class OutputFailed(UserError, OSError):
    """An output the system would not let us write (a full disk, a quota); nothing half-written is left in use."""


class MissingPackage(UserError, ImportError):
    """An optional package the chosen path needs (the message says how to install it, or how to do without)."""


class UnreadableInput(UserError, ValueError):
    """A file the user named exists but cannot be read as what it should be (truncated, corrupt, another format)."""


@contextlib.contextmanager
def unreadable_file(what: str, errors: tuple[type[BaseException], ...] = (OSError,)):
    """Errors of type `errors` raised while reading the file `what` (e.g. "LoRA runs/a/model") become one
    UnreadableInput naming it. Only wrap the reading call itself, so that a bug elsewhere keeps its traceback."""
    try:
        yield
    except UserError:
        raise
    except errors as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnreadableInput(f"{what} cannot be read ({reason}). It is damaged or incomplete (an interrupted copy, "
                              "download or save?): copy it again, or pass another one.") from error


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback of an error, not just its one-line message.")


def run(main) -> None:
    """Call `main()` (which parses sys.argv); a user error becomes `error: ...` on stderr and its exit code."""
    try:
        main()
    except USER_ERRORS as error:
        if "--debug" in sys.argv[1:]:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
