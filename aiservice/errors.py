"""The error tree. SQL raises custom SQLSTATEs; each maps to one error here and one HTTP status."""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base of every error the service reports to callers."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class NotFound(ServiceError):
    """SQLSTATE AS404: no such job, batch, limit, webhook or delivery."""

    status = 404
    code = "not_found"


class InvalidState(ServiceError):
    """SQLSTATE AS409: the job's status does not allow the operation."""

    status = 409
    code = "invalid_state"


class LeaseLost(ServiceError):
    """SQLSTATE AS410: the job is no longer this worker's running job (fencing)."""

    status = 409
    code = "lease_lost"


class IdempotencyConflict(ServiceError):
    """SQLSTATE AS412: the idempotency_key names a job that another request created (details:
    idempotency_key, job_id, the fields that differ and, in a batch, the job's index)."""

    status = 409
    code = "idempotency_conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class ClientDisconnected(ServiceError):
    """The client closed the connection before its request body arrived. Nobody reads the answer;
    499 (nginx's "client closed request") keeps such requests apart in logs and metrics."""

    status = 499
    code = "client_disconnected"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class RequestTimeout(ServiceError):
    """The request's body stopped arriving for HTTP_BODY_TIMEOUT; the connection is closed after the answer."""

    status = 408
    code = "request_timeout"


class TooManyWaits(ServiceError):
    """More waits (POST /jobs/wait, GET /jobs/{id}?wait=) than WAIT_MAX_CONCURRENT in all or
    WAIT_MAX_PER_CALLER for this caller are open: answered at once, with Retry-After."""

    status = 429
    code = "too_many_waits"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidArgument(ServiceError):
    """SQLSTATE AS422, a constraint violation, or a request that fails validation."""

    status = 422
    code = "invalid_argument"


class DatabaseUnavailable(ServiceError):
    status = 503
    code = "database_unavailable"


class SchemaMismatch(DatabaseUnavailable):
    """The database's schema is not the one this code was written for (see aiservice.db.schema). A
    DatabaseUnavailable too, so loops that wait out an unreachable PostgreSQL wait this out as well."""

    code = "schema_mismatch"


class SchemaNotMigrated(SchemaMismatch):
    """The database lacks migrations this code needs: `aiservice migrate` has not run yet."""

    code = "schema_not_migrated"


class SchemaTooNew(SchemaMismatch):
    """The database has migrations this code does not know: it was migrated by a newer aiservice."""

    code = "schema_too_new"


class Contention(ServiceError):
    """SQLSTATE 40P01 (deadlock) or 40001 (serialization failure), still there after JobStore's retries:
    the statement was rolled back and changed nothing, so the caller may simply send it again."""

    status = 503
    code = "contention"


SQLSTATE_ERRORS: dict[str, type[ServiceError]] = {
    "AS404": NotFound,
    "AS409": InvalidState,
    "AS410": LeaseLost,
    "AS412": IdempotencyConflict,
    "AS422": InvalidArgument,
    "23514": InvalidArgument,  # check_violation
    "23502": InvalidArgument,  # not_null_violation
    "22P02": InvalidArgument,  # invalid_text_representation
    "22P05": InvalidArgument,  # untranslatable_character (\u0000 in jsonb)
    "22021": InvalidArgument,  # character_not_in_repertoire
    "22003": InvalidArgument,  # numeric_value_out_of_range
    "22008": InvalidArgument,  # datetime_field_overflow
    "22007": InvalidArgument,  # invalid_datetime_format
    "22023": InvalidArgument,  # invalid_parameter_value
    "2201E": InvalidArgument,  # invalid_argument_for_logarithm (huge backoff inputs)
    "54000": InvalidArgument,  # program_limit_exceeded (jsonb too deep or too large)
    "54001": InvalidArgument,  # statement_too_complex (deep nesting)
    "2201W": InvalidArgument,  # invalid_row_count_in_limit_clause (negative limit via SQL)
    # Rolled back for concurrent transactions: retried by JobStore, then 503, never 500.
    "40001": Contention,  # serialization_failure
    "40P01": Contention,  # deadlock_detected
    # PostgreSQL cannot serve us at all: readiness answers 503, requests 503, never 500.
    "08000": DatabaseUnavailable,  # connection_exception
    "08001": DatabaseUnavailable,  # sqlclient_unable_to_establish_sqlconnection
    "08003": DatabaseUnavailable,  # connection_does_not_exist (closed mid-query)
    "08004": DatabaseUnavailable,  # sqlserver_rejected_establishment_of_sqlconnection
    "08006": DatabaseUnavailable,  # connection_failure
    "28000": DatabaseUnavailable,  # invalid_authorization_specification
    "28P01": DatabaseUnavailable,  # invalid_password
    "3D000": DatabaseUnavailable,  # invalid_catalog_name (the database was dropped)
    "53300": DatabaseUnavailable,  # too_many_connections
    "57P01": DatabaseUnavailable,  # admin_shutdown
    "57P02": DatabaseUnavailable,  # crash_shutdown
    "57P03": DatabaseUnavailable,  # cannot_connect_now (starting up or shutting down)
}
