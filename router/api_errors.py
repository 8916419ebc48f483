"""HTTP API errors in the OpenAI error shape.

Every failure the ingress reports is an :class:`APIError`; ``to_body()`` gives the JSON body
``{"error": {"message", "type", "param", "code"}}`` that the OpenAI clients understand.

Status codes and what they mean here:

======  =========================  ===========================================================
status  type                       used for
======  =========================  ===========================================================
400     ``invalid_request_error``  malformed body (bad JSON or UTF-8, not an object), a field of
                                   the wrong type or out of range, an unknown field, an unknown
                                   SLO class, a bad ``x-slo-*`` header, a prompt over the
                                   context length (code ``context_length_exceeded``)
404     ``not_found_error``        ``model`` is not served (code ``model_not_found``)
413     ``invalid_request_error``  the body is larger than the configured limit (param ``body``)
422     ``invalid_request_error``  well formed and valid for OpenAI, but a feature this server
                                   does not support (``n`` > 1, ``echo``, ``logprobs``, non-zero
                                   penalties, ``logit_bias``, tools ...; code
                                   ``unsupported_parameter``)
429     ``rate_limit_error``       a sheddable request was shed (code ``rate_limit_exceeded``)
500     ``server_error``           a bug or an engine failure
503     ``server_error``           no replica can take the request (code ``overloaded``)
======  =========================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Mapping

from replicas.errors import InvalidRequestError

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error answered to an HTTP client: status, message, offending ``param``, type and code.

    ``headers`` are extra response headers (e.g. ``Retry-After`` on 429/503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = INVALID_REQUEST,  # the OpenAI field name
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"

    def to_body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    # Constructors for the common cases -----------------------------------------------------

    @classmethod
    def invalid(cls, param: str | None, message: str, code: str | None = None) -> APIError:
        """400: a malformed request or a bad field value."""
        return cls(400, message, param=param, code=code)

    @classmethod
    def unsupported(cls, param: str, message: str) -> APIError:
        """422: a valid OpenAI parameter value this server does not implement."""
        return cls(422, message, param=param, code="unsupported_parameter")

    @classmethod
    def model_not_found(cls, model: str, served: list[str]) -> APIError:
        """404: ``model`` is not one of the served models."""
        message = f"The model {model!r} does not exist; this server serves {served}"
        return cls(404, message, param="model", type=NOT_FOUND, code="model_not_found")

    @classmethod
    def body_too_large(cls, size: int, limit: int) -> APIError:
        """413: the request body exceeds ``limit`` bytes."""
        message = f"request body is {size} bytes, over the limit of {limit} bytes"
        return cls(413, message, param="body", code="request_too_large")

    @classmethod
    def shed(cls, message: str, retry_after_s: float | None = None) -> APIError:
        """429: a sheddable request was rejected because its SLO cannot be met."""
        return cls(429, message, type=RATE_LIMIT, code="rate_limit_exceeded", headers=_retry(retry_after_s))

    @classmethod
    def overloaded(cls, message: str, retry_after_s: float | None = None) -> APIError:
        """503: no replica is available or all are overloaded."""
        return cls(503, message, type=SERVER_ERROR, code="overloaded", headers=_retry(retry_after_s))

    @classmethod
    def internal(cls, message: str = "internal server error") -> APIError:
        """500: an unexpected failure."""
        return cls(500, message, type=SERVER_ERROR, code="internal_error")

    @classmethod
    def from_invalid_request(cls, exc: InvalidRequestError) -> APIError:
        """400 from the engine's :class:`~replicas.errors.InvalidRequestError` (keeps its field)."""
        return cls(400, exc.message, param=exc.field)


MAX_RETRY_AFTER_S = 60  # every Retry-After hint is clamped to [1, this] whole seconds


def _retry(retry_after_s: float | None) -> dict[str, str]:
    if retry_after_s is None:
        return {}
    return {"Retry-After": str(min(max(1, round(retry_after_s)), MAX_RETRY_AFTER_S))}
