"""How a command ends: errors a user can fix exit 2, a diverged run 1, a run stopped at request 3."""
from __future__ import annotations

EXIT_INTERRUPTED = 3  # launchers requeue a job that exits with this code


class UsageError(Exception):
    """Bad command-line input, reported as one line with exit code 2."""


class TrainingInterrupted(Exception):
    """A run stopped early at request (preemption, SIGTERM) after a checkpoint: exit code 3."""


def exit_status(error: Exception) -> int | None:
    """2 for errors a user can fix, 1 for a diverged run, None for a bug (shown with its traceback).
    The error types are imported here, not at start-up, so quick commands do not load torch."""
    from tessera.core.config import ConfigError
    from tessera.core.data import DataError
    from tessera.core.trainer import TrainingDiverged
    from tessera.distributed.env import DistributedTimeout
    from tessera.kernels import KernelBackendError

    if isinstance(error, (ConfigError, DataError, UsageError, KernelBackendError, FileNotFoundError, ValueError,
                          DistributedTimeout)):
        return 2
    if isinstance(error, TrainingDiverged):
        return 1
    return None
