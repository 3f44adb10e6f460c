"""What every job shares at its edge: exit codes, and bad input reported as one line.

Every job ends through :func:`run_main`:

- 0: success.
- 1: internal failure; the traceback goes to stderr.
- 2: bad input: an option, field, file or record the job cannot use. One line on stderr
  (``error: ...``) names it, the value and what is allowed; no traceback.
- 130: interrupted (Ctrl-C).

Bad input is a :class:`detector.fields.FieldError`, a :class:`UsageError`, an argparse error,
a ``SystemExit("message")``, or one of the error classes the job names to ``run_main(main, errors=...)``
(e.g. ``AnnotationError``). Code that turns user input into objects can run inside
``with bad_input():`` so that its ``ValueError`` / ``OSError`` count as bad input; anything
raised outside such a block and not listed is an internal failure.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, Optional

from detector.fields import FieldError

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_CODES", "UsageError",
           "bad_input", "call_main", "run_main", "add_exit_codes"]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_CODES = """exit codes:
  0    success
  1    internal failure (traceback on stderr)
  2    bad input: the option, field, file or record, its value and what is allowed (one line on stderr)
  130  interrupted"""


class UsageError(ValueError):
    """Bad input a job found itself (``--device tpu: no such device; use cpu, cuda or cuda:N``)."""


@contextmanager
def bad_input(*types: type[BaseException], prefix: str = "") -> Iterator[None]:
    """Inside the block, ``types`` (default ``ValueError`` and ``OSError``) are bad input.

    They are re-raised as :class:`UsageError` with ``prefix`` (e.g. ``"--out: "``) before the
    message, so :func:`run_main` reports them in one line with exit code 2.
    """
    types = types or (ValueError, OSError)
    try:
        yield
    except UsageError:
        raise
    except types as e:
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        raise UsageError(f"{prefix}{message}") from e


def call_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
              errors: Sequence[type[BaseException]] = ()) -> int:
    """Run ``main(argv)`` and return its exit code, reporting failures as the module docstring says.

    ``errors``: the job's own bad-input error classes besides ``FieldError`` and ``UsageError``.
    """
    bad = (FieldError, UsageError, *errors)
    try:
        rc = main(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code if str(e.code).startswith("error") else f"error: {e.code}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except bad as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE
    return EXIT_OK if rc is None else int(rc)


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
             errors: Sequence[type[BaseException]] = ()) -> NoReturn:
    """``sys.exit(call_main(main, argv, errors))``: the last line of every job."""
    code = call_main(main, argv, errors)
    sys.stdout.flush()
    sys.exit(code)


def add_exit_codes(parser: argparse.ArgumentParser, extra: str = "") -> argparse.ArgumentParser:
    """Append the exit-code table (and ``extra`` lines, e.g. the bad input this job checks) to
    ``parser``'s ``--help`` epilogue, keeping the help's line breaks."""
    parts = [p for p in (parser.epilog, EXIT_CODES, extra) if p]
    parser.epilog = "\n\n".join(parts)
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser
