"""Typed exceptions of logitd.

Every exception is a :class:`LogitdError`. Failures the server reports carry
its message (``message``, also ``str(exc)``), its gRPC code name (``code``,
e.g. ``"INVALID_ARGUMENT"``) and the attempts the client made (``attempts``,
after retries on UNAVAILABLE and RESOURCE_EXHAUSTED). Errors raised by the
client itself (bad arguments, the tokenizer check) have ``code = None``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LogitdError",
    "InvalidArgument",
    "Unavailable",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Unauthenticated",
    "PermissionDenied",
    "Cancelled",
    "FailedPrecondition",
    "Unimplemented",
    "Internal",
    "TokenizerMismatch",
    "VocabMismatch",
    "ConfigError",
    "MalformedTargets",
    "ShardError",
    "ClientClosed",
]


class LogitdError(Exception):
    """Base class of every logitd error."""

    def __init__(self, message: str, *, code: str | None = None, attempts: int | None = None):
        super().__init__(message)
        #: The server's message (or the client's, when ``code`` is None).
        self.message = message
        #: The gRPC status code name, e.g. ``"UNAVAILABLE"``; None for client-side errors.
        self.code = code
        #: Attempts made (retries included), for server errors.
        self.attempts = attempts
        #: For errors raised by :class:`logitd.Prefetcher`: the batch they belong to.
        self.batch: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.attempts))


def _rebuild(cls: type[LogitdError], message: str, code: str | None, attempts: int | None) -> LogitdError:
    return cls(message, code=code, attempts=attempts)


class InvalidArgument(LogitdError, ValueError):
    """INVALID_ARGUMENT (or OUT_OF_RANGE): the request is wrong; never retried."""


class Unavailable(LogitdError, ConnectionError):
    """UNAVAILABLE: no server answered (after the retries)."""


class ResourceExhausted(LogitdError):
    """RESOURCE_EXHAUSTED: the server was overloaded (after the retries)."""


class DeadlineExceeded(LogitdError, TimeoutError):
    """DEADLINE_EXCEEDED: no answer within ``timeout_s``."""


class Unauthenticated(LogitdError, PermissionError):
    """UNAUTHENTICATED: a missing or wrong bearer token."""


class PermissionDenied(LogitdError, PermissionError):
    """PERMISSION_DENIED."""


class Cancelled(LogitdError):
    """CANCELLED."""


class FailedPrecondition(LogitdError):
    """FAILED_PRECONDITION."""


class Unimplemented(LogitdError):
    """UNIMPLEMENTED."""


class Internal(LogitdError):
    """INTERNAL: a server-side failure."""


class TokenizerMismatch(LogitdError):
    """The server's tokenizer differs from ``expect_tokenizer_sha256``."""


class VocabMismatch(LogitdError):
    """The server's vocabulary size differs from ``expect_vocab_size``."""


class ConfigError(LogitdError, ValueError):
    """An invalid client setting (endpoint URI, TLS files, token)."""


class MalformedTargets(LogitdError):
    """A reply whose columns do not fit together."""


class ShardError(LogitdError):
    """A target shard could not be read (missing, damaged, another run's)."""


class ClientClosed(LogitdError, RuntimeError):
    """A call on a TeacherClient after its ``close()`` (or the end of its ``with`` block)."""
