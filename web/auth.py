"""Who may use the console and the API.

One password (settings.web_password) guards everything but /healthz (and /metrics when
public). The API takes HTTP Basic (any user name) or `Authorization: Bearer <password>`.
Pages use a login form and a signed session cookie; every HTML form carries a CSRF token
derived from the session. The signing key is scrypt(password, salt "dq-session"): the same
in every process and instance, and changing the password ends every session. A signed
cookie is handed to anyone who opens the login page, so the key must be dear to guess
offline: scrypt (n=2**14, r=8: ~16 MB and tens of ms a guess) where a plain HMAC cost a
few microseconds. Every password given (form, Basic, Bearer) is judged through
`password_ok`: a wrong one waits, and wrong ones are rate-limited per address and overall
(see web.throttle).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from fastapi import Request
from starlette.datastructures import FormData

from web import throttle
from web.errors import FORBIDDEN, TOO_MANY, UNAUTHORIZED, ApiError, LoginRequired

SESSION_COOKIE: Final = "dq_session"
SESSION_TTL: Final = 12 * 3600
_CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="dq", charset="UTF-8"'}
_API_HELP: Final = ("send HTTP Basic auth (any user name, the console password) or the header "
                    "'Authorization: Bearer <password>'")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Session:
    """A browser session: `auth` once the password was given (always, with no password)."""

    nonce: str
    auth: bool
    issued: int
    cookie: str
    csrf: str


@functools.lru_cache(maxsize=4)
def session_key(password: str) -> bytes:
    """The key session cookies and CSRF tokens are signed with (once per process)."""
    return hashlib.scrypt(password.encode(), salt=b"dq-session", n=2**14, r=8, p=1,
                          dklen=32)


class Keys:
    """Password checks, session cookies and CSRF tokens, all derived from the password."""

    def __init__(self, password: str) -> None:
        self.password = password
        self._key = session_key(password)

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def check_password(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.password.encode())

    def issue(self, *, auth: bool, now: float | None = None) -> Session:
        nonce = secrets.token_urlsafe(18)
        issued = int(time.time() if now is None else now)
        text = f"{nonce}.{int(auth)}.{issued}"
        return Session(nonce, auth, issued, f"{text}.{self._sign(text)}",
                       self._sign("csrf:" + nonce))

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None when it is forged, malformed or expired."""
        if not cookie or len(cookie) > 200:
            return None
        text, _, sig = cookie.rpartition(".")
        if not hmac.compare_digest(sig.encode(), self._sign(text).encode()):
            return None
        nonce, auth, issued = [*text.split("."), "", "", ""][:3]
        if not issued.isdigit() or auth not in ("0", "1"):
            return None
        age = (time.time() if now is None else now) - int(issued)
        if not -60 <= age <= SESSION_TTL:
            return None
        return Session(nonce, auth == "1", int(issued), cookie, self._sign("csrf:" + nonce))

    def api_ok(self, authorization: str) -> bool:
        """Whether an Authorization header carries the password (Basic or Bearer)."""
        if not self.password:
            return True
        scheme, _, cred = authorization.strip().partition(" ")
        cred = cred.strip()
        if scheme.lower() == "bearer":
            return self.check_password(cred)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(cred, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            _, sep, password = decoded.partition(":")
            return bool(sep) and self.check_password(password)
        return False


def _keys(request: Request) -> Keys:
    keys: Keys = request.app.state.dq.keys
    return keys


def current_session(request: Request) -> Session | None:
    """The request's valid session, if its cookie carries one."""
    return _keys(request).verify(request.cookies.get(SESSION_COOKIE))


def ensure_session(request: Request, *, auth: bool) -> Session:
    """The request's session, or a new one the response will set (see app middleware)."""
    sess = current_session(request)
    if sess is None:
        sess = _keys(request).issue(auth=auth)
        request.state.set_session = sess
    return sess


def require_page(request: Request) -> Session:
    """Dependency of every page: a logged-in session, else off to the login form."""
    keys = _keys(request)
    sess = current_session(request)
    if not keys.password and (sess is None or not sess.auth):
        sess = keys.issue(auth=True)
        request.state.set_session = sess
    if sess is not None and sess.auth:
        request.state.session = sess
        return sess
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginRequired(target if request.method == "GET" else "/")


class TooManyGuesses(ApiError):
    """429: wrong passwords from this address (or everywhere) are over their limit."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(429, TOO_MANY, "too many wrong passwords from your address or from "
                         f"everywhere at once; try again in {retry_after} s",
                         headers={"Retry-After": str(retry_after)})


async def password_ok(request: Request, check: Callable[[], bool]) -> bool:
    """Judge a password with `check`, unless wrong ones from this client are over their
    limit (TooManyGuesses, before `check` runs: a limited answer says nothing about the
    password). A wrong one waits throttle.LIMITS.wait before the caller answers."""
    guard: throttle.LoginGuard = request.app.state.dq.guard
    key = throttle.client_key(request.client.host if request.client else None)
    retry_after = guard.refusal(key)
    if retry_after:
        raise TooManyGuesses(retry_after)
    ok = check()
    guard.record(key, ok)  # no await since refusal(): concurrent guesses are all counted
    if not ok:
        await asyncio.sleep(throttle.LIMITS.wait)  # slows each guess, on top of the limit
    return ok


async def require_api(request: Request) -> None:
    """Dependency of every API route: Basic or Bearer with the password."""
    keys = _keys(request)
    header = request.headers.get("authorization")
    if not keys.password:
        return
    if not header:
        raise ApiError(401, UNAUTHORIZED, f"this API needs the console password: {_API_HELP}",
                       headers=_CHALLENGE)
    if not await password_ok(request, lambda: keys.api_ok(header)):
        raise ApiError(401, UNAUTHORIZED, f"wrong credentials: {_API_HELP}", headers=_CHALLENGE)


async def require_docs(request: Request) -> None:
    """The API docs: a logged-in browser session or the API's credentials."""
    sess = current_session(request)
    if sess is not None and sess.auth:
        request.state.session = sess
        return
    if request.headers.get("authorization") or request.url.path.endswith(".json"):
        await require_api(request)
        return
    require_page(request)


def check_csrf(sess: Session, form: FormData) -> None:
    """Refuse (403) a form POST that does not carry this session's token."""
    token = form.get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), sess.csrf.encode()):
        raise ApiError(403, FORBIDDEN, "this form is missing its security token or comes from "
                       "another site (or your session changed); reload the page and try again")


def safe_next(target: str | None) -> str:
    """A local path to go to after login; anything else (another site) becomes '/'."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
