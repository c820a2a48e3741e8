"""Errors that cross the wire: each has a stable ``code`` that travels in error replies.

The broker and the executor raise these; the client rebuilds the same class from a reply's code
(``error_from_code``), so a caller catches ``QuotaExceeded`` whichever side found the problem.
"""

from __future__ import annotations


class MigKernelError(Exception):
    """Base of every error mig-kernel reports; ``code`` names the problem for machines."""

    code = "error"

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.code)
        self.details = details


class MalformedMessage(MigKernelError):
    code = "malformed_message"


class AuthenticationError(MigKernelError):
    """Bad or missing signature, unknown client or key."""

    code = "bad_signature"


class ReplayedMessage(MigKernelError):
    """A message id seen before, or a timestamp outside the replay window."""

    code = "replayed_message"


class UnknownRequest(MigKernelError):
    code = "unknown_request"


class BadRequest(MigKernelError):
    """A well-formed message whose fields do not make sense (wrong types, missing fields)."""

    code = "bad_request"


class UnknownProfileError(MigKernelError):
    code = "unknown_profile"


class NoSuchSlice(MigKernelError):
    """No slice on this node could ever satisfy the request (too much memory asked, say)."""

    code = "no_such_slice"


class NoCapacity(MigKernelError):
    """No fitting slice is free and the caller asked not to wait."""

    code = "no_capacity"


class QuotaExceeded(MigKernelError):
    code = "quota_exceeded"


class LeaseNotFound(MigKernelError):
    code = "lease_not_found"


class LeaseEnded(MigKernelError):
    """The lease was released or reclaimed (idle, holder lost, admin)."""

    code = "lease_ended"


class NotPermitted(MigKernelError):
    """The caller's identity may not do this (admin operations, another user's lease)."""

    code = "not_permitted"


class AcquireTimeout(MigKernelError, TimeoutError):
    code = "acquire_timeout"


class AcquireCancelled(MigKernelError):
    code = "acquire_cancelled"


class LayoutRefused(MigKernelError):
    """An admin layout change refused; ``details['reason']`` is the inventory's reason code."""

    code = "layout_refused"


class SliceUnavailable(MigKernelError):
    """The slice cannot be changed now (draining, broken, leased)."""

    code = "slice_unavailable"


class BrokerUnavailable(MigKernelError, ConnectionError):
    """No broker answered (not running, or its connection file is stale)."""

    code = "broker_unavailable"


class ExecutorUnavailable(MigKernelError, ConnectionError):
    code = "executor_unavailable"


class StorageUnavailable(MigKernelError):
    """The broker cannot write its state (disk full, I/O error): it keeps serving existing
    leases but grants no new one until its storage works again."""

    code = "storage_unavailable"


class InternalError(MigKernelError):
    """A bug on the serving side; the daemon keeps running and says so."""

    code = "internal_error"


def _all_subclasses(cls: type[MigKernelError]) -> list[type[MigKernelError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def error_from_code(code: str, message: str, details: dict | None = None) -> MigKernelError:
    """The exception class a reply's error code names (MigKernelError if unknown)."""
    for cls in _all_subclasses(MigKernelError):
        if cls.code == code:
            return cls(message, **(details or {}))
    err = MigKernelError(message, **(details or {}))
    err.code = code
    return err
