"""One error type for the HTTP API, and the handlers that render every error.

Every error response has the body ``{"error": {"code", "message", "field"}}``.
Client mistakes get a 4xx whose message names the field and the fix. Anything
else gets a 500 with a generic message, and its traceback goes to the log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A rejected request, with the HTTP status code and headers to return."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(
    status_code: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build the JSON error response shared by every handler."""
    return JSONResponse(
        status_code=status_code,
        content={"error": {"code": code, "message": message, "field": field}},
        headers=headers,
    )


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """Turn pydantic's errors into one 422 that names the first invalid field."""
    errors = exc.errors()
    messages = []
    first_field: str | None = None
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(location) or None
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "field required; add it to the request"
        messages.append(f"{field}: {message}" if field else message)
        first_field = first_field or field
    return ApiError(422, "invalid_request", "; ".join(messages), first_field)


async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return error_response(
        exc.status_code, exc.code, exc.message, exc.field, headers=exc.headers
    )


async def _request_validation_handler(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    error = validation_error(exc)
    return error_response(error.status_code, error.code, error.message, error.field)


async def _http_exception_handler(
    request: Request, exc: StarletteHTTPException
) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
    code = codes.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}; see /docs"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, message, headers=headers)


async def _unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error(
        "%s %s failed with an internal error",
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return error_response(
        500, "internal_error", "internal server error; the server log has details"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that render every error as an ErrorResponse."""
    # Starlette types handlers as taking any Exception; each gets only its own.
    app.add_exception_handler(ApiError, _api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(
        RequestValidationError,
        _request_validation_handler,  # type: ignore[arg-type]
    )
    app.add_exception_handler(
        StarletteHTTPException,
        _http_exception_handler,  # type: ignore[arg-type]
    )
    app.add_exception_handler(Exception, _unhandled_error_handler)
