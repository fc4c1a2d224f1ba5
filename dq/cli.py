"""Console entry points: `dq-master` (the whole system) and `dq-web` (only the console).

This module is imported by the master, so it imports no role, redis-py, httpx or
SQLAlchemy at module level.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from dq.config import Settings, load_settings
from dq.errors import EXIT_BOOT, EXIT_CONFIG, ConfigError
from dq.logs import setup_logging
from dq.master import Arbiter
from dq.supervise import ROLE_PATHS, BootError, anchor_paths, daemonize

DESCRIPTION = """\
dq is a delay queue with HTTP callbacks: clients add jobs over TCP, and when a job falls
due dq calls its topic's callback URL, retrying on failure. dq-master opens the TCP port,
then starts and supervises the server, timer, consumer, checker and web console
processes. With no --redis it runs its own redis-server in the data dir, so a bare
`dq-master` is a working system.

Settings come from defaults < the config file (dq.toml) < DQ_* environment variables <
these flags. Signals: TERM/INT stop gracefully, QUIT stops fast, HUP/USR2 reload,
TTIN/TTOU add/remove a consumer."""

EPILOG = """\
examples:
  dq-master                                  embedded Redis and SQLite in ./var
  dq-master --port 6789 --web-port 8088 --web-password s3cret
  dq-master --redis redis://10.0.0.5:6379/0 --redis redis://10.0.0.6:6379/0 \\
            --db 'mysql+pymysql://dq:pw@db/dq' --consumers 4
  dq-master --config /etc/dq/dq.toml --daemon --pid-file /run/dq.pid --log-dir /var/log/dq
  kill -USR2 $(cat /run/dq.pid)              reload without refusing a connection
"""


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line (plus the --help hint) and exits with EXIT_CONFIG."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("storage")
    g.add_argument("--redis", action="append", metavar="URL",
                   help="a Redis shard, redis://host:port/db, rediss:// or unix://path; "
                        "repeat for several shards (default: embedded redis-server)")
    g.add_argument("--db", metavar="URL",
                   help="registry database, a SQLAlchemy URL such as "
                        "mysql+pymysql://user:pw@host/dq (default: SQLite in the data dir)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="where the embedded Redis and SQLite live (default ./var)")
    g.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: $DQ_CONFIG, else ./dq.toml if present)")


def _web_flags(parser: argparse.ArgumentParser, *, toggle: bool) -> None:
    g = parser.add_argument_group("web console")
    g.add_argument("--web-port", type=int, metavar="PORT", help="console port (default 8088)")
    g.add_argument("--web-host", metavar="ADDR",
                   help="console address (default 0.0.0.0 with a password, else 127.0.0.1; "
                        "without a password only a loopback address)")
    g.add_argument("--web-password", metavar="PW", help="password for the console")
    if toggle:
        g.add_argument("--no-web", dest="web", action="store_const", const=False,
                       help="do not run the console")


def _log_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logs")
    g.add_argument("--log-dir", metavar="DIR",
                   help="also write daily request_/notify_/err_/notice_YYYYMMDD.txt files "
                        "here (php-delayqueue's names)")
    g.add_argument("--log-format", choices=("text", "json"), help="text (default) or json")
    g.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO (default), WARNING, ERROR")


def build_master_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq-master", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("TCP server")
    g.add_argument("--host", metavar="ADDR", help="address to listen on (default 0.0.0.0)")
    g.add_argument("--port", type=int, metavar="PORT", help="TCP port (default 6789)")
    g.add_argument("--servers", type=int, metavar="N", help="server processes (default 1)")
    _storage_flags(parser)
    g = parser.add_argument_group("delivery")
    g.add_argument("--timers", type=int, metavar="N", help="timer processes (default 2)")
    g.add_argument("--consumers", type=int, metavar="N",
                   help="consumer processes (default 2)")
    _web_flags(parser, toggle=True)
    g = parser.add_argument_group("process")
    g.add_argument("--daemon", action="store_const", const=True,
                   help="run in the background (logs go to --log-dir, else DATA_DIR/log)")
    g.add_argument("--pid-file", metavar="PATH", help="write the master's pid here")
    _log_flags(parser)
    return parser


def build_web_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq-web", description="Run only the dq web console, in the "
                     "foreground, against the same Redis and registry as dq-master.")
    _storage_flags(parser)
    _web_flags(parser, toggle=False)
    _log_flags(parser)
    return parser


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as setting overrides (absent flags are left out)."""
    out = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    if "redis" in out:
        out["redis"] = tuple(out["redis"])
    return out


def _settings(args: argparse.Namespace, prog: str,
              **forced: Any) -> tuple[Settings, dict[str, Any]]:
    overrides = {**overrides_of(args), **forced}
    try:
        settings = anchor_paths(load_settings(overrides, config_file=args.config), Path.cwd())
        setup_logging(settings.replace(daemon=False), prog)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    return settings, overrides


def master_main(argv: list[str] | None = None) -> NoReturn:
    """`dq-master`: parse flags, bind the port, maybe daemonize, run the arbiter."""
    # Until the arbiter's handlers are installed, a reload or scaling signal (systemctl
    # reload right after start) must not kill the master with its default action.
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    args = build_master_parser().parse_args(argv)
    settings, overrides = _settings(args, "dq-master")
    arbiter = Arbiter(settings, overrides=overrides)
    try:
        arbiter.prepare()
    except BootError as exc:
        print(f"dq-master: {exc}", file=sys.stderr)
        sys.exit(EXIT_BOOT)
    if settings.daemon:
        daemonize()
        setup_logging(arbiter.cfg, "dq-master")
    sys.exit(arbiter.run())


async def _serve_web(settings: Settings) -> None:
    import asyncio

    from dq.worker import Context, load_role

    ctx = Context(settings, "web")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    await load_role(ROLE_PATHS["web"])(ctx)


def web_main(argv: list[str] | None = None) -> NoReturn:
    """`dq-web`: only the console, in the foreground."""
    import asyncio

    import setproctitle

    args = build_web_parser().parse_args(argv)
    # web=True before validation: a console without a password must be on loopback even
    # when the config file turns the master's console off.
    settings, _ = _settings(args, "dq-web", web=True)
    setproctitle.setproctitle("dq-web")
    asyncio.run(_serve_web(settings))
    sys.exit(0)


if __name__ == "__main__":
    master_main()
