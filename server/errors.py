"""Domain errors and their one mapping to gRPC status codes.

The tree (two families: the caller's fault and a dependency's fault)::

    CrsError
    ├── ClientError                 the request cannot succeed as sent
    │   ├── InvalidKey              INVALID_ARGUMENT   malformed PAN, token, ABA, ids, oversize batch
    │   ├── Unauthenticated         UNAUTHENTICATED    no, bad, expired or unregistered credentials
    │   ├── PermissionDenied        PERMISSION_DENIED  authenticated, but the RPC/key needs a scope it lacks
    │   ├── RateLimited             RESOURCE_EXHAUSTED the caller's token bucket is empty
    │   ├── NotFound                NOT_FOUND          well-formed key that matches nothing
    │   ├── AlreadyExists           ALREADY_EXISTS     natural key taken (PAN already issued, ...)
    │   ├── FailedPrecondition      FAILED_PRECONDITION  e.g. a card on a closed account
    │   ├── VersionConflict         ABORTED            optimistic concurrency: expected_version stale
    │   ├── OutOfRange              OUT_OF_RANGE       a Watch from a sequence compaction removed
    │   └── FeedOverload            RESOURCE_EXHAUSTED too many snapshots on a node, or a stalled one's reader
    ├── InternalError               INTERNAL           a bug met while answering one key (logged where it happened)
    └── BackendError                a dependency failed; the caller may retry
        ├── BackendUnavailable      UNAVAILABLE        PostgreSQL (or every cache path) unreachable
        │   └── CommitLost          UNAVAILABLE        PostgreSQL lost during a COMMIT, a request_id to retry with
        ├── BackendTimeout          DEADLINE_EXCEEDED  a dependency did not answer in time
        ├── WriteOutcomeUnknown     DEADLINE_EXCEEDED  PostgreSQL lost during a COMMIT, no request_id to retry with
        └── WriteConflict           ABORTED            PostgreSQL broke a lock cycle between two writes

Messages are written for the caller and must never contain a full PAN or account number: the core
builds them from masked values or lengths only. `status_for` is the only place that knows gRPC codes.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"   # the rich error model's trailer (google.rpc.Status)


class CrsError(Exception):
    """Base of every error the service raises on purpose. `details`: messages a caller can act on,
    sent as google.rpc.Status details (the rich error model) next to the code and message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # What the audit trail records for an admin write that failed with it; empty: the status's name.
    audit_result: ClassVar[str] = ""

    def __init__(self, message: str, *, details: tuple[Message, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ClientError(CrsError):
    """The request is wrong; retrying it unchanged will fail again."""


class InvalidKey(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(ClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class VersionConflict(ClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(ClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class FeedOverload(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InternalError(CrsError):
    """An unexpected error (a bug) while answering one key of a batch or a stream, logged where it
    happened: that key answers INTERNAL and the others go on."""

    code = grpc.StatusCode.INTERNAL


class BackendError(CrsError):
    """A dependency (PostgreSQL, Redis) failed; the same request may succeed later."""

    code = grpc.StatusCode.UNAVAILABLE


class BackendUnavailable(BackendError):
    code = grpc.StatusCode.UNAVAILABLE


class BackendTimeout(BackendError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class WriteOutcomeUnknown(BackendError):
    """The connection to PostgreSQL was lost during a write's COMMIT, which may have been applied, and
    the request has no request_id: a retry could write it twice. DEADLINE_EXCEEDED, which gRPC defines
    as "may have completed" and which the recommended retry policy (server/client_config.py) does not
    retry; with a request_id the same loss answers UNAVAILABLE (CommitLost), retried safely. Audited
    COMMIT_LOST, not as a failure: the write's own row says OK if it was applied."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    audit_result = "COMMIT_LOST"


class CommitLost(BackendUnavailable):
    """The same loss for a request with a request_id: UNAVAILABLE, which the channel retries, and the
    retry answers the first write's result if it was applied. Audited COMMIT_LOST."""

    audit_result = "COMMIT_LOST"


class WriteConflict(BackendError):
    """PostgreSQL chose this write to end a deadlock (or a serialization failure): nothing was
    written, and the same request, retried, will normally succeed."""

    code = grpc.StatusCode.ABORTED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and caller-facing message for any exception a handler lets escape.

    Unknown exceptions become INTERNAL with a generic message: their text may carry data we do not
    control (driver errors can quote parameters), so it is logged masked and never sent.
    """
    if isinstance(exc, CrsError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, "internal error"


def status_details_trailer(exc: BaseException) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries `exc.details` (empty when it has none)."""
    details = getattr(exc, "details", ())
    if not isinstance(exc, CrsError) or not details:
        return ()
    packed = []
    for d in details:
        item = any_pb2.Any()
        item.Pack(d)
        packed.append(item)
    status = status_pb2.Status(code=rpc_code_number(exc.code), message=exc.message, details=packed)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def rpc_code_number(code: grpc.StatusCode) -> int:
    """The numeric google.rpc.Code of a status, as LookupResult.code carries it."""
    value: tuple[int, str] = code.value
    return value[0]
