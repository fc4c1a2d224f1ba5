"""The house rules (DESIGN.md section 6, docs/ARCHITECTURE.md), checked on the source.

Data flows one way: cli -> master -> roles -> storage -> sharding -> Redis. Each package may
import only the packages below it; roles never import each other; only dq/storage knows the
scripts; the master imports no redis, aiohttp or SQLAlchemy and runs no event loop; dq never
imports web. Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Leaves every layer may use: settings, error codes, JSON, and the shard URL parsers (pure
# functions that settings and the registry need to check a URL).
LOW = {"dq", "dq.config", "dq.config_check", "dq.errors", "dq.fastjson", "dq.sharding.shardurl",
       "dq.sharding.clusterurl"}
PACKAGES = ("master", "runtime", "wire", "roles", "storage", "sharding", "registry")

# What each package may import, besides itself and LOW.
ALLOWED: dict[str, set[str]] = {
    "dq.cli": {"*"},
    "dq.docs": {"dq.registry"},
    "dq.master": {"dq.runtime", "dq.sharding.plan", "dq.registry"},  # registry: the boot child
    "dq.runtime": {"dq.storage", "dq.sharding", "dq.registry"},
    "dq.roles": {"dq.runtime", "dq.storage", "dq.sharding", "dq.registry", "dq.wire"},
    "dq.storage": {"dq.sharding"},
    "dq.sharding": set(),
    "dq.registry": set(),
    "dq.wire": set(),
    "dq.client": {"dq.wire"},
}
# The roles (each a child process kind); the other modules of dq.roles are what they call on.
ROLES = ("dq.roles.server", "dq.roles.timer", "dq.roles.consumer", "dq.roles.checker")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from dq import x`
    return found


def sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def owner(name: str) -> str:
    """The package a dq module belongs to for these rules (dq.roles.x -> dq.roles)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def within(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def real_dq_modules(names: set[str]) -> set[str]:
    """The names that are dq modules or packages (not `from dq.x import SomeClass`)."""
    out = set()
    for n in names:
        if not (n == "dq" or n.startswith("dq.")):
            continue
        rel = Path(*n.split("."))
        if (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file():
            out.add(n)
    return out


def test_every_package_imports_only_what_lies_below_it() -> None:
    wrong = []
    for path in sources("dq"):
        name = module_name(path)
        pkg = owner(name)
        allowed = set() if name in LOW else ALLOWED.get(pkg)
        assert allowed is not None, f"{name}: a new top-level part of dq; add it to ALLOWED"
        if "*" in allowed:
            continue
        for dep in real_dq_modules(imports_of(path)):
            if dep in LOW or dep in PACKAGE_NAMES or within(dep, {pkg} | allowed):
                continue
            wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the data flow (DESIGN.md section 6):\n" + "\n".join(wrong)


PACKAGE_NAMES = {f"dq.{p}" for p in PACKAGES}  # `from dq.sharding import x`: x is what counts


def test_package_inits_import_nothing() -> None:
    """So importing dq.sharding.plan (the master does) loads no redis client with it."""
    for pkg in PACKAGES:
        tree = ast.parse((ROOT / "dq" / pkg / "__init__.py").read_text())
        assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], pkg


def test_roles_never_import_each_other() -> None:
    wrong = []
    for path in sources("dq/roles"):
        name = module_name(path)
        mine = next((r for r in ROLES if within(name, {r})), None)
        for dep in real_dq_modules(imports_of(path)):
            other = next((r for r in ROLES if within(dep, {r})), None)
            if other is not None and other != mine:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_dq_never_imports_web() -> None:
    for path in sources("dq"):
        deps = imports_of(path)
        assert not any(within(d, {"web"}) for d in deps), f"{module_name(path)} imports web"


@pytest.mark.parametrize("module", ["dq.master.arbiter", "dq.master.children", "dq.cli"])
def test_the_master_imports_no_redis_aiohttp_sqlalchemy_or_event_loop(module: str) -> None:
    code = (f"import sys, {module}\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'redis', 'aiohttp', 'sqlalchemy', 'asyncio', 'uvloop', 'fastapi', 'hiredis'})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "", f"importing {module} pulls in {out}"


MAX_MODULE, MAX_FUNCTION, MAX_METHODS = 400, 50, 25


def test_no_module_function_or_class_is_too_big_to_read() -> None:
    """No module over 400 lines, no function over 50, no class over 25 methods (issue 18):
    past those, split along a seam (docs/ARCHITECTURE.md says where things go)."""
    big = []
    for path in sources("dq", "web"):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE:
            big.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION:
                    big.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
            elif isinstance(node, ast.ClassDef):
                methods = sum(isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)
                              for b in node.body)
                if methods > MAX_METHODS:
                    big.append(f"{rel}:{node.lineno} class {node.name}: {methods} methods")
    assert not big, "too big to read at once:\n" + "\n".join(big)


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: a storage module importing a role is caught."""
    fake = ROOT / "dq" / "storage" / "store.py"
    deps = real_dq_modules(imports_of(fake)) | {"dq.roles.consumer"}
    assert [d for d in deps if not (d in LOW or within(d, {"dq.storage"} | ALLOWED["dq.storage"]))]
