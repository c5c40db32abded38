"""The one exception tree of nagents_frames.

Every error the library raises, or writes into a row's ``error`` cell, is one of these::

    NagentsFramesError
    ├── ConfigurationError            (also ValueError) bad arguments, raised before any request leaves
    │   ├── TemplateError             a prompt template that is empty, malformed or names a missing column
    │   ├── ColumnNotFoundError       a named column is not in the table (lists the available ones)
    │   ├── ColumnTypeError           a column has a type that cannot hold prompts / messages
    │   ├── UnsupportedFrameError     (also TypeError) the data is not a frame type we know
    │   └── DuplicateRequestIdError   two requests of one job share an id
    ├── StoreError                    the DuckDB store cannot do what was asked
    │   ├── StoreLockedError          another process holds the store file for writing
    │   ├── SchemaVersionError        the file was written by a newer (or unknown) schema version
    │   └── JobNotFoundError          (also KeyError) no job with that id
    ├── JobError                      about a whole job
    │   ├── JobNotFinishedError       results asked of a job that is still running (says how far it is)
    │   ├── JobFailedError            the job ended FAILED; ``__cause__`` is the fatal error
    │   ├── JobCancelledError         the job was cancelled before it finished
    │   └── DeadlineExceededError     the whole-job deadline passed
    └── RequestError                  one request failed; in a table this is the row's ``error`` cell
        ├── PromptError               the row has no usable prompt (null, empty, too long, bad UTF-8)
        ├── APIConnectionError        could not reach the server / connection dropped      (retryable)
        │   └── APITimeoutError       connect or per-request timeout                      (retryable)
        ├── MalformedResponseError    not JSON, missing fields, truncated body             (retryable)
        ├── ContentFilteredError      the provider refused or blocked the answer (safety)
        ├── ResponseValidationError   the answer does not match the requested response_format
        └── APIStatusError            the server answered with an HTTP error status
            ├── BadRequestError       400, 413, 422 and other 4xx not listed here
            ├── AuthenticationError   401                                                   (fatal)
            ├── PermissionDeniedError 403                                                   (fatal)
            ├── NotFoundError         404 (unknown model or path)                           (fatal)
            ├── RequestTimeoutError   408                                                   (retryable)
            ├── ConflictError         409                                                   (retryable)
            ├── RateLimitError        429                                                   (retryable)
            └── ServerError           5xx, and 529 "overloaded"                             (retryable)

Whether a request is retried is decided by :class:`nagents_frames.RetryPolicy` from the exception's type
and HTTP status only (``error.retryable`` / ``error.fatal``), never from message text. A *fatal* error
(bad credentials, unknown model) stops the whole job after a handful of requests instead of failing every
row one by one.

Example::

    >>> from nagents_frames.errors import error_for_status, RateLimitError
    >>> isinstance(error_for_status(429, "slow down"), RateLimitError)
    True
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ColumnNotFoundError",
    "ColumnTypeError",
    "ConfigurationError",
    "ConflictError",
    "ContentFilteredError",
    "DeadlineExceededError",
    "DuplicateRequestIdError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobNotFinishedError",
    "JobNotFoundError",
    "MalformedResponseError",
    "NagentsFramesError",
    "NotFoundError",
    "PermissionDeniedError",
    "PromptError",
    "RateLimitError",
    "RequestError",
    "RequestTimeoutError",
    "ResponseValidationError",
    "SchemaVersionError",
    "ServerError",
    "StoreError",
    "StoreLockedError",
    "TemplateError",
    "UnsupportedFrameError",
    "error_for_status",
]


class NagentsFramesError(Exception):
    """Base of every error raised by nagents_frames."""


# --- configuration: raised before any request is sent -------------------------------------------


class ConfigurationError(NagentsFramesError, ValueError):
    """An argument is invalid; raised before any request leaves."""


class TemplateError(ConfigurationError):
    """A prompt template is empty, malformed, or names a column the table does not have."""


class ColumnNotFoundError(ConfigurationError):
    """A named column is missing; the message lists the available columns."""


class ColumnTypeError(ConfigurationError):
    """A column's type cannot hold what it is used for (prompts, messages, parameters)."""


class UnsupportedFrameError(ConfigurationError, TypeError):
    """The data is not a polars / pandas DataFrame, an Arrow table or record batch reader."""


class DuplicateRequestIdError(ConfigurationError):
    """Two requests of one job share an id."""


# --- store ----------------------------------------------------------------------------------------


class StoreError(NagentsFramesError):
    """The DuckDB store cannot do what was asked."""


class StoreLockedError(StoreError):
    """Another process holds the store file open for writing."""


class SchemaVersionError(StoreError):
    """The store file has a schema version this release does not know (written by a newer one)."""


class JobNotFoundError(StoreError, KeyError):
    """No job with that id exists in the manager or its store."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else "job not found"


# --- whole jobs -------------------------------------------------------------------------------------


class JobError(NagentsFramesError):
    """Something about a whole job."""


class JobNotFinishedError(JobError):
    """Results were asked of a job that has not reached a terminal status."""


class JobFailedError(JobError):
    """The job ended FAILED; ``__cause__`` holds the fatal error when there was one."""


class JobCancelledError(JobError):
    """The job was cancelled before it finished."""


class DeadlineExceededError(JobError):
    """The whole-job deadline passed before every request was answered."""


# --- single requests: these end up in a row's error cell -------------------------------------------


class RequestError(NagentsFramesError):
    """One request failed. ``retryable`` / ``fatal`` are class facts, not guesses from the message."""

    retryable: ClassVar[bool] = False
    fatal: ClassVar[bool] = False

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code

    @property
    def type_name(self) -> str:
        """The class name, as written to the ``error_type`` column of the store."""
        return type(self).__name__

    def cell(self) -> str:
        """The text written to a row's ``error`` cell: type, status, message."""
        status = f" {self.status_code}" if self.status_code is not None else ""
        return f"{self.type_name}{status}: {self.message}"


class PromptError(RequestError):
    """The row has no usable prompt: null, empty, over the size limit or not valid UTF-8."""


class APIConnectionError(RequestError):
    """The server could not be reached, or the connection dropped mid-request."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """Connecting, or the whole request, took longer than its timeout."""


class MalformedResponseError(RequestError):
    """The body was not JSON, was truncated, or lacked the fields the API promises."""

    retryable = True


class ContentFilteredError(RequestError):
    """The provider blocked the prompt or the answer (safety / content filter)."""


class ResponseValidationError(RequestError):
    """The answer does not validate against the requested ``response_format``."""


class APIStatusError(RequestError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """400 and other client errors that retrying cannot fix."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong. Fatal for the job."""

    fatal = True


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or endpoint. Fatal for the job."""

    fatal = True


class NotFoundError(APIStatusError):
    """404: the model or the endpoint does not exist. Fatal for the job."""

    fatal = True


class RequestTimeoutError(APIStatusError):
    """408 from the server."""

    retryable = True


class ConflictError(APIStatusError):
    """409 from the server."""

    retryable = True


class RateLimitError(APIStatusError):
    """429: over the provider's rate limit."""

    retryable = True


class ServerError(APIStatusError):
    """5xx (and 529 overloaded): the provider failed; usually transient."""

    retryable = True


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    429: RateLimitError,
}


def error_for_status(status: int, message: str, *, retry_after: float | None = None) -> APIStatusError:
    """Map an HTTP error status to its exception class.

    >>> error_for_status(503, "busy").retryable
    True
    """
    if status >= 500:
        cls: type[APIStatusError] = ServerError
    else:
        cls = _STATUS_CLASSES.get(status, BadRequestError)
    return cls(message, status_code=status, retry_after=retry_after)
