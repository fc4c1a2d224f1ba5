"""Errors the console and the API raise, and how each becomes a response.

API errors are JSON `{"detail": ..., "err": ..., "errors": {field: message}}`; the same
failures on a page render the error page (or, for an expired session, go to the login).
"""

from __future__ import annotations

import logging
from typing import Any, Final
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dq.errors import (
    BAD_REQUEST,
    NOT_FOUND,
    TOO_LARGE,
    TOPIC_OFFLINE,
    UNAVAILABLE,
    UNKNOWN_TOPIC,
    DqError,
)
from web.views import render

log = logging.getLogger(__name__)

# Words the web layer adds to dq.errors' for its own refusals.
UNAUTHORIZED: Final = "unauthorized"
FORBIDDEN: Final = "forbidden"
INVALID: Final = "invalid"
EXISTS: Final = "exists"
MAIL_FAILED: Final = "mail_failed"
NOT_CONFIGURED: Final = "not_configured"
TOO_MANY: Final = "too_many_attempts"

DQ_STATUS: Final = {NOT_FOUND: 404, UNKNOWN_TOPIC: 404, TOPIC_OFFLINE: 409, BAD_REQUEST: 400,
                    TOO_LARGE: 413, UNAVAILABLE: 503}
_WORD_OF_STATUS: Final = {400: BAD_REQUEST, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: NOT_FOUND,
                          405: BAD_REQUEST, 409: EXISTS, 413: TOO_LARGE, 422: INVALID,
                          429: TOO_MANY, 503: UNAVAILABLE}


class ApiError(Exception):
    """A refusal with a status, a stable `err` word, a sentence and per-field messages."""

    def __init__(self, status: int, err: str, detail: str,
                 errors: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.err, self.detail = status, err, detail
        self.errors = errors or {}
        self.headers = headers


class Invalid(ApiError):
    """Field validation failed; `errors` maps each bad field to what to do about it."""

    def __init__(self, errors: dict[str, str], detail: str = "") -> None:
        first = next(iter(errors.items()), ("", ""))
        super().__init__(422, INVALID, detail or f"{len(errors)} field(s) need fixing, e.g. "
                         f"{first[0]}: {first[1]}", errors)


class LoginRequired(Exception):
    """A page asked without a valid session while a password is set."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def from_dq(exc: DqError) -> ApiError:
    return ApiError(DQ_STATUS.get(exc.err, 400), exc.err, exc.msg)


def wants_json(request: Request) -> bool:
    path = request.url.path
    if path.startswith("/api/") or path in ("/api", "/healthz", "/openapi.json", "/metrics"):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def json_error(exc: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"detail": exc.detail, "err": exc.err, "errors": exc.errors}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _page_error(request: Request, exc: ApiError) -> Response:
    return render(request, "error.html", {"status": exc.status, "detail": exc.detail,
                                          "err": exc.err}, status=exc.status,
                  headers=exc.headers if exc.status != 401 else None)


def respond(request: Request, exc: ApiError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status,
                    exc.err, exc.detail)
    return json_error(exc) if wants_json(request) else _page_error(request, exc)


def _validation_errors(exc: RequestValidationError) -> ApiError:
    errors: dict[str, str] = {}
    body_broken = ""
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ())]
        kind = str(e.get("type", ""))
        if loc[:1] == ["body"] and (len(loc) == 1 or kind in ("json_invalid", "dict_type")):
            body_broken = ("the request body must be a JSON object, e.g. "
                           '{"topic": "order", ...}' if kind != "json_invalid" else
                           f"the request body is not valid JSON: {e.get('msg', '')}")
            continue
        errors[loc[-1] if loc else "request"] = str(e.get("msg", "is not valid"))
    if body_broken:
        return ApiError(400, BAD_REQUEST, body_broken)
    return Invalid(errors)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into our JSON or the error page."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return respond(request, exc)

    async def on_dq_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DqError)
        return respond(request, from_dq(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"there is nothing at {request.url.path}"
        word = _WORD_OF_STATUS.get(exc.status_code, BAD_REQUEST)
        return respond(request, ApiError(exc.status_code, word, detail,
                                         headers=getattr(exc, "headers", None)))

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return respond(request, _validation_errors(exc))

    async def on_login(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return RedirectResponse("/login?next=" + quote(exc.next_path, safe="/"), status_code=303)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(DqError, on_dq_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(LoginRequired, on_login)
