"""The one exception type a user sees: its message is printed as one line, exit code 2."""


class FcnError(Exception):
    """A problem with the user's input (file, flag, data). The message names the file and the fix."""

    exit_code = 2


class TrainingFailed(FcnError):
    """Training ran but went wrong (divergence, a runaway loss): the user's files were fine."""

    exit_code = 3

    def __init__(self, message: str, epoch: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.epoch, self.loss = epoch, loss
