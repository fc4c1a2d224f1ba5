"""The test suite's own set-up: without MariaDB the MariaDB tests skip and say how to run
them, unless DQ_TEST_MYSQL asks for MariaDB (as .ci/run does): then they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.procs import free_port

REPO = Path(__file__).resolve().parent.parent


def run_pytest(tmp: Path, closed: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """pytest on one test that needs a MariaDB database, with this repository's fixtures
    and its default server moved to `closed`, where nothing listens."""
    (tmp / "conftest.py").write_text(
        "import tests.conftest as c\n"
        f"c.MYSQL_DEFAULT = {closed!r}\n"
        "from tests.conftest import *  # noqa: F403\n")
    (tmp / "test_needs_mariadb.py").write_text(
        "def test_it(mariadb_url):\n    assert mariadb_url\n")
    base = {k: v for k, v in os.environ.items() if k != "DQ_TEST_MYSQL"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp)],
        capture_output=True, text=True, timeout=120, cwd=tmp,
        env={**base, "PYTHONPATH": str(REPO), **env})


def test_mariadb_tests_skip_with_how_to_run_them_when_there_is_none(tmp_path: Path) -> None:
    closed = f"mysql+pymysql://root:@127.0.0.1:{free_port()}"
    res = run_pytest(tmp_path, closed, {})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout
    assert f"no MariaDB at {closed}" in res.stdout
    assert "set DQ_TEST_MYSQL=mysql+pymysql://USER:PASSWORD@HOST:PORT" in res.stdout


def test_mariadb_tests_fail_when_dq_test_mysql_asks_for_one_that_is_not_there(
        tmp_path: Path) -> None:
    closed = f"mysql+pymysql://root:@127.0.0.1:{free_port()}"
    res = run_pytest(tmp_path, "mysql+pymysql://root:@127.0.0.1:1", {"DQ_TEST_MYSQL": closed})
    assert res.returncode != 0, res.stdout
    assert "1 error" in res.stdout and "skipped" not in res.stdout
    assert "Can't connect to MySQL server" in res.stdout


def test_ci_sets_dq_test_mysql_and_runs_readmes_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    command = "python3 -m pytest -q -n auto"
    assert f"pip install -e '.[test]' && {command}\n" in readme
    assert ci.rstrip().splitlines()[-1] == command
    assert "export DQ_TEST_MYSQL=" in ci
