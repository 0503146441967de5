"""Errors a user can cause: the CLI prints their message as one line and exits non-zero."""

import signal


class UserError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class RunFailed(UserError):
    """A ``shard`` run wrote what it could but its output is not acceptable as it is (shards
    that could not be read, more failed samples than ``--max-failure-rate``). The CLI exits
    1; ``summary`` is the merged summary that was written to ``protection.json``."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class ReaderDied(UserError):
    """A process that reads the input shards (a DataLoader worker) died during a run (``kill
    -9``, the out-of-memory killer): the run stops like on SIGTERM, a rerun resumes."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM, SIGINT or SIGHUP during a
    run, so the run stops like on Ctrl-C: partial files are removed and a rerun resumes.
    ``signum`` is the signal; the CLI exits ``128 + signum``."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
