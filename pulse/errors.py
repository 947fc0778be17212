"""Errors a user can cause or meet; each message is one plain sentence, shown as is by the API and CLI."""


class PulseError(Exception):
    """Base of the errors that reach a user; ``status`` is the HTTP status that fits."""

    status = 500


class NotFound(PulseError):
    status = 404


class Conflict(PulseError):
    status = 409


class Invalid(PulseError):
    status = 422


class KeyTaken(Conflict, Invalid):
    """An idempotency key already used by another user.

    The request itself is well formed; it conflicts with what is stored, so HTTP says 409. It stays an
    ``Invalid`` for Python callers that catch it as one.
    """

    status = 409


class Unavailable(PulseError):
    status = 503
