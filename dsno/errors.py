"""The one base class of the errors a user can fix, and how entry points report them.

Every error that means "your input is wrong" (a config value, a file from disk, a data set,
a sampler folder) derives from `UserError`. Entry points catch it, print `error: <message>`
in one line and exit with status 2 (`report_errors`); with `HYDRA_FULL_ERROR=1` or `--debug`
the traceback is shown instead. Anything else is a programming error and still raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator



class UserError(ValueError):
    """A mistake in the user's input; the message names the key or file and says how to fix it."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file the user must provide is missing; the message says what to put where."""


class UnsafeFileError(UserError):
    """A file would run code when loaded (a pickle, an unverified program) and was refused."""


class DiskFullError(UserError, OSError):
    """The disk filled while writing; the message names the path and the free bytes."""


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when the user asked for tracebacks: HYDRA_FULL_ERROR=1 or --debug on the command line."""
    argv = sys.argv if argv is None else argv
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or "--debug" in argv


def one_line(err: BaseException) -> str:
    """The error's message on one line (continuation lines joined with ' | ')."""
    text = str(err).strip() or type(err).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


INTERRUPTED_STATUS = 130        # a shell's status for a command ended by SIGINT (128 + 2)


@contextlib.contextmanager
def report_errors(interrupted: str = "what was finished is kept; the same command goes on from there"
                  ) -> Iterator[None]:
    """Turn a `UserError` into `error: ...` on stderr and exit status 2, and Ctrl-C (KeyboardInterrupt)
    into `interrupted: <interrupted>` and exit status 130 (unless debugging)."""
    try:
        yield
    except UserError as err:
        if debug_requested():
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug_requested():
            raise
        print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)

