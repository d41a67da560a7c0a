"""User-facing errors: one clear message, no traceback wall, a non-zero exit status.

Every error a user can fix (a bad recipe, bad data, a bad teacher, a broken launch) is raised
as a subclass of :class:`DistillError`. Entry points catch it, print ``error: <message>`` and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class DistillError(Exception):
    """Base class for errors whose message tells the user what to fix."""

    exit_code = 2


class RecipeError(DistillError):
    """The recipe (file or override) is invalid."""


class DataError(DistillError):
    """The data source cannot be loaded or is unusable."""


class TeacherError(DistillError):
    """The teacher checkpoint is missing, corrupt, mismatched or useless."""


class LaunchError(DistillError):
    """The launch configuration (processes, precision, devices) is broken."""


class RunStateError(DistillError):
    """The run directory is in a state that forbids this command (e.g. already finished)."""


class TrainingError(DistillError):
    """Training cannot continue (e.g. a non-finite loss)."""


class StorageError(DistillError):
    """The output directory cannot be written (disk full, read-only, no permission)."""


# errno values that mean "this location cannot take our files": reported as StorageError with the
# path instead of a traceback (disk full is the common one on shared machines).
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


def storage_error(exc: OSError, what: str, hint: str) -> StorageError:
    """``cannot write <what> (<path>: <reason>); <hint>``."""
    where = exc.filename or what
    return StorageError(f"cannot write {what} ({where}: {exc.strerror or exc}); {hint}")
