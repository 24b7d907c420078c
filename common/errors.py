"""The error types every layer raises; the CLI and the service map them to exits and statuses."""

import errno


class InputError(ValueError):
    """Bad input from a user: the message says what was expected and what came in."""


class ConflictError(InputError):
    """A well-formed request that the current state refuses (a switch to a version that is not
    there or not ready): 409 in the service, exit 2 in the CLI."""


class NotReadyError(RuntimeError):
    """A resource the request needs (model, index) is not loaded yet."""


class StoreRetired(NotReadyError):
    """A write reached a store that a version switch has retired (store/versions.py): the
    writer takes the version now served and writes again (a 503 only if none is loaded)."""


class IntegrityError(RuntimeError):
    """Stored data failed its integrity check (a checksum, a count): never served as if valid."""


class BackendError(RuntimeError):
    """The index backend (Milvus) refused a request that passed our checks: a 500, since no
    retry changes it (not a 503, which says "retry")."""


class NoSpaceError(RuntimeError):
    """The device holding stored files is full: the write was not kept (507); free space."""


def is_no_space(err: BaseException) -> bool:
    """Whether an error says the device is full (an OSError's ENOSPC, SQLite's SQLITE_FULL)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "database or disk is full" in str(err)
