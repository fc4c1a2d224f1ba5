"""The dq-web role: the console and admin API as one FastAPI app, served by uvicorn.

`create_app` builds the app (tests call it directly); `run(ctx)` serves it until the
process is asked to stop. uvicorn's own signal handling stays off: dq's child machinery
owns the process's signals and sets `ctx.stopping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Final
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from dq.config import Settings
from dq.config_check import is_loopback
from dq.errors import ConfigError
from dq.registry.core import Registry
from dq.runtime.context import Context, open_store, read_plan, role_plan
from dq.storage.store import Store
from web import api, errors, metrics, pages, pages_ops
from web.auth import SESSION_COOKIE, SESSION_TTL, Keys
from web.errors import FORBIDDEN, TOO_LARGE, ApiError
from web.protocol import KEEP_ALIVE, GuardedH11Protocol
from web.state import WebState
from web.views import HERE, make_templates

log = logging.getLogger(__name__)

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'self'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_SAFE_METHODS: Final = ("GET", "HEAD", "OPTIONS")
MAX_BODY: Final = 256 * 1024  # bytes of a request body: a job's body is at most 9,999
_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1", "[::1]")


def allowed_hosts(settings: Settings) -> tuple[str, ...] | None:
    """Host names a console without a password answers to (None: any).

    Without a password the console trusts whoever reaches it, so it listens only on a
    loopback address (the settings refuse any other, see `run`) and answers only to
    loopback names: a web page cannot then reach it through DNS rebinding.
    """
    if settings.web_password:
        return None
    return (*_LOOPBACK, settings.web_host.lower()) if settings.web_host else _LOOPBACK


def _refusal(request: Request, hosts: tuple[str, ...] | None) -> str:
    """Why a request must be refused before routing ('' when it may go on): a host name
    not allowed, or a state-changing request sent by another site's page.

    Browsers say where a request comes from in Sec-Fetch-Site; older ones only in Origin,
    which is compared with Host (or X-Forwarded-Host, behind a proxy that rewrites Host).
    """
    host_header = (request.headers.get("host") or "").lower()
    host = host_header.partition("]")[0] + "]" if host_header.startswith("[") \
        else host_header.rsplit(":", 1)[0]
    if hosts is not None and host not in hosts:
        return f"this console has no password, so it only answers to 127.0.0.1 (not {host!r})"
    if request.method in _SAFE_METHODS:
        return ""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site is not None:
        cross = site not in ("same-origin", "none")
    elif origin is not None:
        known = {host_header, (request.headers.get("x-forwarded-host") or "").lower()}
        cross = origin == "null" or urlsplit(origin).netloc.lower() not in known
    else:
        cross = False
    return "cross-site requests are refused; use the console itself or the API" if cross else ""


def _too_big(request: Request) -> str:
    """Why a request's body must not be read ('' when it may): every form and API body
    here is small, and it is read (a form before its session is checked) into memory."""
    if request.method in _SAFE_METHODS:
        return ""
    length = request.headers.get("content-length")
    if length is None:
        if request.headers.get("transfer-encoding"):
            return "send the request with a Content-Length header"
        return ""
    if not length.isdigit() or int(length) > MAX_BODY:
        return f"the request body is over {MAX_BODY // 1024} KiB; nothing here takes that much"
    return ""


def create_app(settings: Settings, *, registry: Registry | None = None,
               store: Store | None = None) -> FastAPI:
    """The console and API over `registry` and `store` (opened from settings when None;
    then they are closed with the app)."""
    st = _open_state(settings, registry, store)
    app = FastAPI(title="dq admin API", version="1", lifespan=_lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None,
                  description="Topics, shards, alert settings, jobs and dead letters of a dq "
                  "delay queue. Authenticate with HTTP Basic (any user name, the console "
                  "password) or `Authorization: Bearer <password>`.")
    app.state.dq = st
    hosts = allowed_hosts(settings)
    errors.install(app)
    app.include_router(metrics.router)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(pages_ops.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _install_guard(app, st, hosts)
    return app


def _open_state(settings: Settings, registry: Registry | None,
                store: Store | None) -> WebState:
    """The app's state, opening the registry and store not given (the app then owns them)."""
    own_registry, own_store = registry is None, store is None
    if registry is None:
        registry = Registry(settings.db_url())
    if store is None:
        store = open_store(settings, read_plan(settings, registry))
    return WebState(settings=settings, registry=registry, store=store,
                    templates=make_templates(settings.zone), keys=Keys(settings.web_password),
                    own_store=own_store, own_registry=own_registry)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """When the app stops, close the store and registry it opened itself."""
    yield
    st: WebState = app.state.dq
    if st.own_store:
        await st.store.shards.close()
    if st.own_registry:
        st.registry.close()


def _install_guard(app: FastAPI, st: WebState, hosts: tuple[str, ...] | None) -> None:
    """The middleware every request passes: refusals before routing (host, cross-site,
    body size), counters, and the headers and session cookie every response carries."""

    @app.middleware("http")
    async def guard(request: Request,
                    call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        st.counters["requests"] += 1
        why = _refusal(request, hosts)
        too_big = _too_big(request)
        if why:
            response: Response = errors.json_error(ApiError(403, FORBIDDEN, why))
        elif too_big:
            response = errors.json_error(ApiError(413, TOO_LARGE, too_big))
        else:
            response = await call_next(request)
        if response.status_code >= 500:
            st.counters["errors"] += 1
        _dress(request, response)
        return response


def _dress(request: Request, response: Response) -> None:
    """Security headers, no caching but of static files, and a session cookie to set."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.url.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    new = getattr(request.state, "set_session", None)
    if new is not None:
        response.set_cookie(SESSION_COOKIE, new.cookie, max_age=SESSION_TTL, path="/",
                            httponly=True, samesite="lax",
                            secure=request.url.scheme == "https")


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's signals belong to dq."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29 calls this instead
        return None


def listen_socket(host: str, port: int, *, beside: bool = False) -> socket.socket:
    """The console's listening socket. `beside` (under dq-master) adds SO_REUSEPORT, so that
    a reload's new dq-web listens beside the old one, which stops once the new one serves:
    the console is never away. The master checks that the port is free before it forks the
    first dq-web, or one on another address (dq/master/children.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if beside:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def run(ctx: Context) -> None:
    """Serve the console until ctx.stopping is set, then finish open requests and stop."""
    settings = ctx.settings
    host = settings.web_bind_host
    if not settings.web_password:
        if not is_loopback(host):  # dq.config refuses it; Settings built in code are not checked
            raise ConfigError(f"web_host {host!r} without a web_password would open the "
                              "console to anyone who can reach it: set web_password, or "
                              "bind web_host 127.0.0.1")
        log.warning("no web_password: console bound to %s only", host)
    registry = await asyncio.to_thread(Registry, settings.db_url())
    store = open_store(settings, await role_plan(ctx, registry))
    app = create_app(settings, registry=registry, store=store)
    try:
        sock = listen_socket(host, settings.web_port, beside=ctx.master_pid is not None)
    except OSError as exc:
        await store.shards.close()
        registry.close()
        raise OSError(exc.errno, f"dq-web cannot listen on {host}:{settings.web_port}: "
                      f"{exc.strerror}; set web_port or web_host") from exc
    # Deadlines on reading requests and the connection cap live in the protocol class.
    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False,
                            lifespan="off", timeout_graceful_shutdown=int(settings.grace),
                            http=GuardedH11Protocol, ws="none", timeout_keep_alive=KEEP_ALIVE)
    server = _Server(config)
    port = sock.getsockname()[1]
    log.info("%s serving the console on http://%s:%d/", ctx.name, host, port)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    stop = asyncio.create_task(ctx.stopping.wait())
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            ctx.ready.set()
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await task
    finally:
        stop.cancel()
        sock.close()
        await store.shards.close()
        registry.close()
        st = app.state.dq
        log.info("%s stopped: requests=%d errors=%d wrong_passwords=%d guesses_refused=%d",
                 ctx.name, st.counters["requests"], st.counters["errors"],
                 st.guard.judged_wrong, st.guard.refused)
