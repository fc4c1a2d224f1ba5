"""Where people reach dq, as the master sees it: whether dq-web's address is free before
it forks one, and the line that says the system is up. Standard library only."""

from __future__ import annotations

import socket

from dq.config import Settings


def web_listen_error(cfg: Settings, *, beside_old: bool = False) -> str:
    """Why dq-web could not listen on its address now ('' when it could): the master binds
    it with SO_REUSEADDR, as dq-web will, and closes it again. `beside_old`: the old dq-web
    listens there (a reload), so also with SO_REUSEPORT, as dq-web binds; otherwise not,
    so that a port another program shares out that way is still found taken."""
    host = cfg.web_bind_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if beside_old:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, cfg.web_port))
    except OSError as exc:
        return (f"dq-web cannot listen on {host}:{cfg.web_port}: {exc.strerror or exc}; "
                "set web_port or web_host, or --no-web")
    return ""


def ready_line(cfg: Settings, listener: socket.socket | None) -> str:
    """The one line that says the system is up and what to do next (README's commands)."""
    host, port = listener.getsockname()[:2] if listener is not None else (cfg.host, cfg.port)
    here = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    parts = [f"dq is ready: clients add jobs on TCP {host}:{port}"]
    if cfg.web:
        web = cfg.web_bind_host
        web_here = "127.0.0.1" if web in ("0.0.0.0", "::") else web
        auth = "-u :$DQ_WEB_PASSWORD " if cfg.web_password else ""
        parts.append(f"the console is http://{web_here}:{cfg.web_port}/")
        parts.append(f"register a topic: curl {auth}-H 'content-type: application/json' "
                     f"{web_here}:{cfg.web_port}/api/topics -d '{{\"topic\": \"demo\", "
                     f"\"callback\": \"http://127.0.0.1:8000/cb\"}}'")
    else:
        parts.append("no console (--no-web): register topics in the registry's dq_topic")
    parts.append(f"add a job: python3 -c \"from dq.client import DqClient; "
                 f"DqClient(['{here}:{port}']).add('demo', '1', {{'hello': 'world'}}, "
                 f"delay=5)\"")
    return "; ".join(parts)
