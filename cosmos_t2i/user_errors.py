"""A user's mistake ends a script with one line, `error: ...` saying the fix, and exit code 2; no traceback.

Tracebacks stay for bugs, and for `--debug`. What counts as the user's: a `UserError` (raised where the check is
made, as a subclass of the built-in error it stands for, so callers catching FileNotFoundError etc. still do), and
the file-system errors about a path the user gave (missing, existing, not permitted), whose messages name it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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


# The disk, not the input: no space, a quota, a file-size limit (ulimit -f), a read-only mount.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def disk_refusal(error: BaseException) -> OSError | None:
    """The OSError in `error`'s cause chain that says the disk refused a write (OUTPUT_ERRNOS), or None. The chain
    is searched: pyarrow and Pillow raise an error of their own while closing a file the disk refused."""
    from .hub_errors import find_in_chain

    return find_in_chain(error, lambda e: isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS)


@contextlib.contextmanager
def writing_output(what: str):
    """A disk that refuses a write (full, a quota, ulimit -f, read-only) inside the block becomes one OutputFailed
    line naming `what`. Other errors pass unchanged, so that a bad input is still named as such."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        refusal = disk_refusal(error)
        if refusal is None:
            raise
        raise OutputFailed(f"Writing {what} failed ({refusal.strerror}); nothing of it was kept. Free space there "
                           "(or write elsewhere) and run the same command again.") from error


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
