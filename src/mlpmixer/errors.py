"""What went wrong, as the command line reports it.

``UsageError`` (a ``ValueError``) is bad input: arguments, configuration values, input files and
checkpoints named on the command line; ``mlpmixer`` exits with status 2. Anything else that stops a
run (a full disk, a non-finite loss) is a runtime failure, status 1; Ctrl-C is 130.
"""

from __future__ import annotations

import difflib


class UsageError(ValueError):
    """Bad input; the message names the offending value and what is expected."""


class RunExistsError(UsageError, FileExistsError):
    """``--out`` already holds a run and ``--overwrite`` was not given."""


class DataWarning(UserWarning):
    """Input data that was usable only in part (e.g. unreadable images that were skipped)."""


def did_you_mean(value: str, allowed) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``allowed``, or an empty string."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(name: str, value, allowed) -> UsageError:
    """``unknown model 'x' (did you mean 'y'?); choose one of a, b, c``."""
    return UsageError(f"unknown {name} {value!r}{did_you_mean(value, allowed)}; choose one of {', '.join(allowed)}")
