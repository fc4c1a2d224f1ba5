"""Settings validation: what load_settings refuses, and that it says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dq.config import Settings, load_settings
from dq.config_check import is_loopback
from dq.errors import ConfigError
from tests.support.paths import REPO


def load(**overrides: object) -> Settings:
    return load_settings(overrides, config_file=None, env={})


# -- the console's address without a password --------------------------------------------

@pytest.mark.parametrize("host", ["", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost",
                                  "LocalHost"])
def test_console_without_a_password_may_listen_on_loopback(host: str) -> None:
    assert load(web_host=host).web_host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.1.5", "dq.example",
                                  "fe80::1", "::ffff:10.0.0.1"])
def test_console_without_a_password_elsewhere_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(web_host=host)
    msg = str(err.value)
    assert f"web_host {host!r} without a web_password" in msg
    assert "set web_password" in msg and "127.0.0.1" in msg and "\n" not in msg
    # with a password, or with the console off, the address is fine
    assert load(web_host=host, web_password="pw").web_host == host
    assert load(web_host=host, web=False).web_host == host


def test_console_address_from_the_environment_and_the_config_file_is_checked(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without a web_password"):
        load_settings(None, config_file=None, env={"DQ_WEB_HOST": "0.0.0.0"})
    path = str(tmp_path / "dq.toml")
    Path(path).write_text('[dq]\nweb_host = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="without a web_password"):
        load_settings(None, config_file=path, env={})
    assert load_settings(None, config_file=path, env={"DQ_WEB_PASSWORD": "pw"}).web_password


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.255.0.9", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["", "0.0.0.0", "::", "128.0.0.1", "localhost.evil",
                                     "10.0.0.1"]))


# -- the registry's URL ------------------------------------------------------------------

URLS = [
    "nonsense", "sqlite:///var/dq.sqlite3", "sqlite://", "sqlite:////abs/dq.sqlite3",
    "mysql+pymysql://dq:pw@db/dq?charset=utf8mb4", "mysql+pymysql://dq:p%40ss@db:3306/dq",
    "mysql+pymysql://dq:pw@db:port/dq", "mysql://db:/dq", "mysql://[::1]:3306/dq",
    "mysql://[::1]:x/dq", "://db/dq", "my sql://db/dq", " sqlite:///x", "sqlite:relative",
    "postgresql+psycopg://u@h/d", "mysql://h: 12/x", "x+://h",
]


@pytest.mark.parametrize("url", URLS)
def test_db_url_is_refused_exactly_when_make_url_refuses_it(url: str) -> None:
    try:
        make_url(url)
        parses = True
    except Exception:
        parses = False
    if parses:
        assert load(db=url).db == url
    else:
        with pytest.raises(ConfigError) as err:
            load(db=url)
        msg = str(err.value)
        assert msg.startswith("db is not a valid SQLAlchemy URL") and "\n" not in msg
        assert "mysql+pymysql://user:pass@host/dq" in msg and "sqlite:///" in msg
        assert "pw@" not in msg


def test_checking_the_db_url_does_not_import_sqlalchemy_into_the_master() -> None:
    """The master's children must import SQLAlchemy themselves, after the fork (a reload
    then runs the version on disk), so validation must not load it into the master."""
    code = ("import sys; from dq.config import load_settings; "
            "load_settings({'db': 'mysql+pymysql://u:p@h/dq'}, env={}); "
            "print('sqlalchemy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                         cwd=REPO)
    assert res.stdout.strip() == "False"


def test_a_bad_value_says_where_it_was_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'consumers' \(from DQ_CONSUMERS\): 'x' is not"):
        load_settings(env={"DQ_CONSUMERS": "x"})
    conf = tmp_path / "dq.toml"
    conf.write_text('consumers = "four"\n')
    with pytest.raises(ConfigError, match=rf"'consumers' \(from config file {conf}\): 'four'"):
        load_settings(config_file=str(conf), env={})


def test_grace_and_heartbeat_timeout_are_checked() -> None:
    with pytest.raises(ConfigError, match="heartbeat_timeout must be at least 2"):
        load(heartbeat_timeout=0)
    with pytest.raises(ConfigError, match="grace must be 0 or more"):
        load(grace=-1)
    assert load(grace=0, heartbeat_timeout=2).grace == 0


def test_add_timeout_is_bounded_by_redis_timeout() -> None:
    assert load(add_timeout=0).add_timeout == 0  # off: an add waits up to redis_timeout
    assert load(add_timeout=0.25).add_timeout == 0.25
    assert load().add_timeout == 0.4  # twice this stays under the PHP client's 1 s
    for bad in (-0.1, 6.0):
        with pytest.raises(ConfigError, match=r"add_timeout must be 0 \(off\) or a number "
                                              r"of seconds up to redis_timeout"):
            load(add_timeout=bad)
