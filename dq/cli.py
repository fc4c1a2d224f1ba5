"""Console entry points: `dq-master` (the whole system), `dq-web` (only the console) and
`dq-adopt` (one pass adopting php-delayqueue's pending jobs).

This module is imported by the master, so it imports no role, redis-py, httpx or
SQLAlchemy at module level.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

from dq import __version__
from dq.config import LOGS, STORAGE, WEB, Settings, flag_name, load_settings, shown_default
from dq.errors import EXIT_BOOT, EXIT_CONFIG, ConfigError
from dq.master.arbiter import Arbiter
from dq.master.supervise import ROLE_PATHS, BootError, anchor_paths, daemonize
from dq.runtime.logs import setup_logging

DESCRIPTION = """\
dq is a delay queue with HTTP callbacks: clients add jobs over TCP, and when a job falls
due dq calls its topic's callback URL, retrying on failure. dq-master opens the TCP port,
then starts and supervises the server, timer, consumer, checker and web console
processes. With no --redis and no shard in the registry's dq_redis table it runs its
own redis-server in the data dir, so a bare `dq-master` is a working system.

Settings come from defaults < the config file (dq.toml) < DQ_* environment variables <
these flags. Each flag below is a setting: --some-name is some_name in dq.toml and
DQ_SOME_NAME in the environment (lists comma-separated).

Signals: TERM/INT stop gracefully, QUIT stops fast, HUP/USR2 reload, TTIN/TTOU add/remove
a consumer."""

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


def _setting_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...],
                   skip: tuple[str, ...] = ()) -> None:
    """One flag per setting of these groups, its help taken from the setting's definition
    (dq/config.py): --help and README's settings table cannot drift apart."""
    hints = get_type_hints(Settings)
    for group in groups:
        g = parser.add_argument_group(group)
        for f in fields(Settings):
            if f.metadata["group"] != group or f.name in skip:
                continue
            hint = hints[f.name]
            text = f"{f.metadata['help']} (default: {shown_default(f)})".replace("%", "%%")
            opts: dict[str, Any] = {"dest": "config" if f.name == "config_file" else f.name,
                                    "help": text}
            if hint is bool:
                opts["action"] = argparse.BooleanOptionalAction
            else:
                opts["metavar"] = f.metadata["metavar"] or None
                if f.metadata["choices"]:
                    opts["choices"] = f.metadata["choices"]
                elif hint is int or hint is float:
                    opts["type"] = hint
                if hint == tuple[str, ...]:  # repeat the flag: one shard, one range each
                    opts["action"] = "append"
            g.add_argument(flag_name(f.name), **opts)


# Every group of settings, in the order their first setting is declared (dq/config.py).
MASTER_GROUPS = tuple(dict.fromkeys(f.metadata["group"] for f in fields(Settings)))


def build_master_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq-master", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _setting_flags(parser, MASTER_GROUPS)
    return parser


def build_web_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq-web", description="Run only the dq web console, in the "
                     "foreground, against the same Redis and registry as dq-master.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _setting_flags(parser, (STORAGE, WEB, LOGS), skip=("web",))
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: "
                        "$DQ_CONFIG, else ./dq.toml if present)")
    return parser


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as setting overrides (absent flags are left out)."""
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
           if v is not None and k != "config"}
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

    from dq.runtime.context import Context, load_role

    ctx = Context(settings, "web")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    await load_role(ROLE_PATHS["web"])(ctx)


def web_main(argv: list[str] | None = None) -> NoReturn:
    """`dq-web`: only the console, in the foreground."""
    import asyncio

    from dq.runtime.titles import child_name, set_title

    args = build_web_parser().parse_args(argv)
    # web=True before validation: a console without a password must be on loopback even
    # when the config file turns the master's console off.
    settings, _ = _settings(args, "dq-web", web=True)
    set_title(child_name("web"))
    asyncio.run(_serve_web(settings))
    sys.exit(0)


def build_adopt_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq-adopt", description=(
        "Adopt the jobs php-delayqueue left in its Redis (its dq_job_info hash, dq_bucket_* "
        "zsets and dq_<priority>ready_queue lists): move each, once, into dq's layout on the "
        "same shard, to be delivered by dq. dq-master's checker does this by itself at "
        "start and every 30 s; this runs one pass now, on every shard (the `redis` setting "
        "and the enabled dq_redis rows), and says how many jobs it adopted from each. Safe "
        "while dq runs. Stop the original's dq-master first."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _setting_flags(parser, (STORAGE, LOGS))
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: "
                        "$DQ_CONFIG, else ./dq.toml if present)")
    return parser


async def _adopt(settings: Settings) -> int:
    from dq.registry.core import Registry
    from dq.runtime.context import open_store
    from dq.sharding.plan import enabled_shards, plan_shards
    from dq.storage.adopt import Adopter

    registry = Registry(settings.db_url())
    try:
        topics = registry.topics()
        extra = enabled_shards(registry.shards())
    finally:
        registry.close()
    if not settings.redis and not extra:
        print("dq-adopt: no shard is configured (no --redis and no enabled dq_redis row); "
              "php-delayqueue's jobs live in the Redis servers it was configured with: "
              "name them with --redis or --db", file=sys.stderr)
        return EXIT_CONFIG
    store = open_store(settings, plan_shards(settings, extra))
    try:
        done = await Adopter(store).adopt_all({k: t.priority for k, t in topics.items()},
                                              every=True)
    finally:
        await store.shards.close()
    for shard in store.shards.shards:
        c = done.get(shard.label)
        if c is None:
            print(f"{shard.label}: not adopted (it did not answer; see the log)")
            continue
        print(f"{shard.label}: adopted {c['adopted']} (ready {c['ready']}, delayed "
              f"{c['delayed']}, in no queue {c['orphan']}); kept dq's copy of "
              f"{c['superseded']}; dropped {c['gone']} without a body; left {c['changed']} "
              f"that changed meanwhile")
    return 0 if len(done) == len(store.shards.shards) else 1


def adopt_main(argv: list[str] | None = None) -> NoReturn:
    """`dq-adopt`: one adoption pass of php-delayqueue's pending jobs, on every shard."""
    import asyncio

    args = build_adopt_parser().parse_args(argv)
    settings, _ = _settings(args, "dq-adopt")
    if not settings.adopt_prefix:
        print("dq-adopt: adopt_prefix is empty: there is nothing to look for",
              file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.exit(asyncio.run(_adopt(settings)))


def build_move_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dq-move", description=(
        "Move every pending job of a store onto other shards, e.g. from one Redis onto a "
        "Redis Cluster, with its due time, version and attempts (dq/storage/move.py: the guests "
        "machinery's crash-safe steps). First point dq at the new store (--redis "
        "redis+cluster://..., then a reload), so nothing works the old one any more; then "
        "run this with the old store's URL. Ready and in-flight jobs there are moved too, "
        "due at once; dead letters stay there. Safe to interrupt and run again."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--from", dest="move_from", metavar="URL", action="append",
                        required=True, help="a shard to move the jobs off (repeat)")
    parser.add_argument("--to", dest="move_to", metavar="URL", action="append", default=[],
                        help="a shard to move them onto (repeat); default: the `redis` "
                        "setting, the shards dq is configured with")
    parser.add_argument("--wait", type=float, default=60.0, metavar="S",
                        help="seconds to keep trying jobs that cannot move yet (default 60)")
    _setting_flags(parser, (STORAGE, LOGS))
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: "
                        "$DQ_CONFIG, else ./dq.toml if present)")
    return parser


def move_main(argv: list[str] | None = None) -> NoReturn:
    """`dq-move`: move a store's pending jobs onto other shards (dq/storage/move.py)."""
    import asyncio

    from dq.storage.move import move

    args = build_move_parser().parse_args(argv)
    move_from, move_to, wait = args.move_from, args.move_to, args.wait
    del args.move_from, args.move_to, args.wait
    settings, _ = _settings(args, "dq-move")
    to = move_to or list(settings.redis)
    if not to:
        print("dq-move: no shard to move onto: give --to URL, or configure the `redis` "
              "setting (--redis, DQ_REDIS, dq.toml)", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if set(move_from) & set(to):
        print("dq-move: a shard is both --from and --to; name the old store with --from "
              "and the new one with --to", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    reports = asyncio.run(move(move_from, to, settings, wait=wait))
    for r in reports:
        other = {k: v for k, v in (r.outcomes or {}).items() if k != "moved"}
        print(f"{r.shard}: moved {r.moved} jobs ({r.requeued} ready or in flight, moved "
              f"due now); {r.dead_left} dead letters stay there; {r.left} pending jobs left"
              + (f"; other outcomes {other}" if other else ""))
    sys.exit(0 if all(not r.left for r in reports) else 1)


if __name__ == "__main__":
    master_main()
