"""Settings and topic fields explain themselves: --help, --version and README's tables are
made from the definitions (dq/config.py, dq/registry/values.py), and checked against them here."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import dq
from dq.cli import build_master_parser, overrides_of
from dq.config import Settings, env_name, flag_name, load_settings
from dq.docs import ARCHITECTURE, GENERATED, README, REGENERATE, module_tree, render

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dq.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_readme_tables_are_what_the_definitions_make() -> None:
    text = README.read_text(encoding="utf-8")
    assert render(text) == text, (
        f"README.md's settings or topic-fields table is out of date with dq/config.py or "
        f"dq/registry/values.py: run `{REGENERATE}` and commit README.md")


def test_architecture_tree_lists_every_module_as_its_docstring_says() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert render(text, GENERATED[ARCHITECTURE]) == text, (
        f"docs/ARCHITECTURE.md's module tree is out of date with the modules under dq/ and "
        f"web/ (a module added, moved or its docstring changed): run `{REGENERATE}`")
    tree = module_tree()
    for path in sorted((REPO / "dq").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix().removesuffix("__init__.py")
        assert f"\n{rel} " in tree, f"{rel} is missing from the tree"
        assert ast.get_docstring(ast.parse(path.read_text())), (
            f"{rel} has no docstring: say in one sentence what it is, for the tree")


def test_every_setting_is_documented_in_help_and_readme() -> None:
    help_text = " ".join(run_cli("--help").stdout.split())
    readme = README.read_text(encoding="utf-8")
    for f in fields(Settings):
        assert f.metadata.get("help"), (
            f"setting {f.name!r} has no help: declare it with setting(default, help, "
            f"group=...) in dq/config.py, then run `{REGENERATE}`")
        assert flag_name(f.name) in help_text, f.name
        assert f"| `{f.name}` | `{flag_name(f.name)}" in readme, f.name
        assert f"`{env_name(f.name)}`" in readme, f.name
    for words in ("seconds; failed attempt n (0-based) is retried after 2n+1 units",
                  "(default: 60)", "IANA zone"):
        assert words in help_text


def test_a_flag_sets_each_kind_of_setting() -> None:
    args = build_master_parser().parse_args(
        ["--retry-unit", "5", "--lease", "7.5", "--buckets", "4", "--timezone", "UTC",
         "--no-web", "--metrics-public", "--priority-weights", "1,1,1", "--redis",
         "redis://a:1/0", "--redis", "redis://b:2/0", "--max-connections", "10"])
    s = load_settings(overrides_of(args), env={})
    assert (s.retry_unit, s.lease, s.buckets, s.timezone, s.web, s.metrics_public,
            s.priority_weights, s.redis, s.max_connections) == \
        (5.0, 7.5, 4, "UTC", False, True, (1, 1, 1), ("redis://a:1/0", "redis://b:2/0"), 10)
    # absent flags are no overrides: the environment and the config file still apply
    s = load_settings(overrides_of(build_master_parser().parse_args([])),
                      env={"DQ_LEASE": "9"})
    assert s.lease == 9.0 and s.web is True


def test_version_is_the_package_version() -> None:
    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"dq-master {dq.__version__}\n"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]  # one place: dq/__init__.py
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dq.__version__"}
