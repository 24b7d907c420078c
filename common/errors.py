"""The error types every layer raises; the CLI and the service map them to exits and statuses."""


class InputError(ValueError):
    """Bad input from a user: the message says what was expected and what came in."""


class NotReadyError(RuntimeError):
    """A resource the request needs (model, index) is not loaded yet."""


class IntegrityError(RuntimeError):
    """Stored data failed its integrity check (a checksum, a count): never served as if valid."""
