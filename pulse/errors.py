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


class Unavailable(PulseError):
    status = 503
