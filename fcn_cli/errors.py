"""The exceptions a user sees, each printed as one line, and the exit codes they map to.

Exit codes (README, "Exit codes"): 0 ok; 1 partial failure (some inputs bad, the rest done);
2 usage or data error (a flag, a file, a data set: ``FcnError``); 3 runtime failure (divergence,
a full disk, a lost worker, an internal error: ``RuntimeFailure``); 130 / 143 interrupted
(Ctrl-C / SIGTERM, 128 + the signal's number).
"""

from __future__ import annotations

import errno

OK, PARTIAL, USAGE, RUNTIME, SIGINT, SIGTERM = 0, 1, 2, 3, 130, 143

# Errors of the machine, not of the user's request: the same command can succeed once they are fixed.
_RUNTIME_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


class FcnError(Exception):
    """A problem with the user's input (file, flag, data). The message names the file and the fix."""

    exit_code = USAGE


class RuntimeFailure(FcnError):
    """The request was fine but running it failed: a full disk, a lost worker, a diverged run."""

    exit_code = RUNTIME


class TrainingFailed(RuntimeFailure):
    """Training ran but went wrong (divergence, a runaway loss): the user's files were fine."""

    def __init__(self, message: str, epoch: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.epoch, self.loss = epoch, loss


def error_console():
    """Where error lines go: stderr, one line each, and never silenced by --quiet."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def write_error(path, exc: OSError, fix: str) -> FcnError:
    """One line for a failed write of ``path``: a full disk or an I/O error is a runtime failure (3),
    an unwritable or missing folder a usage error (2)."""
    kind = RuntimeFailure if exc.errno in _RUNTIME_ERRNOS else FcnError
    return kind(f"{path}: cannot write ({exc.strerror or exc}); {fix}")
