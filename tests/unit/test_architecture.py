"""The layout's rules (docs/architecture.md), enforced on the code as it is.

Every import of every module is read from its syntax tree, lazy imports inside
functions included, and checked against the layer table; the root path's size
and start-up imports are measured by importing what `kvmgate start` imports.
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "kvmgate"

# layer -> the layers (module prefixes) it may import. A module's layer is the
# longest prefix of its name in this table.
ALLOWED: dict[str, set[str]] = {
    "kvmgate.errors": set(),
    "kvmgate.model": {"kvmgate.model", "kvmgate.errors"},
    "kvmgate.paths": {"kvmgate.model", "kvmgate.errors"},
    "kvmgate.store": {"kvmgate.store", "kvmgate.model", "kvmgate.errors", "kvmgate.paths"},
    "kvmgate.host": {"kvmgate.host", "kvmgate.store", "kvmgate.model", "kvmgate.errors", "kvmgate.paths"},
    "kvmgate.ops": {"kvmgate.ops", "kvmgate.host", "kvmgate.store", "kvmgate.model", "kvmgate.errors", "kvmgate.paths"},
    "kvmgate.verbs": {
        "kvmgate.verbs.common",
        "kvmgate.ops",
        "kvmgate.host",
        "kvmgate.store",
        "kvmgate.model",
        "kvmgate.errors",
        "kvmgate.paths",
    },
    "kvmgate.entry": {
        "kvmgate.verbs",
        "kvmgate.host",
        "kvmgate.store",
        "kvmgate.model",
        "kvmgate.errors",
        "kvmgate.paths",
    },
    # The front end holds no authority: the model for help, and the entry only when root runs it in-process.
    "kvmgate.cli": {"kvmgate.cli", "kvmgate.model", "kvmgate.errors", "kvmgate.paths", "kvmgate.entry", "kvmgate"},
    "kvmgate.gated": {"kvmgate.paths", "kvmgate.errors", "kvmgate.host.sockets"},
    # The console pump runs as the owner in the VM's cgroup: the ring's arithmetic and nothing else.
    "kvmgate.pump": {"kvmgate.model.consolelog"},
    "kvmgate": set(),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the layout uses absolute imports)"
            if node.module and node.module.startswith("kvmgate"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(
                        full
                        if (SRC / (full.replace(".", "/") + ".py")).exists() or (SRC / full.replace(".", "/")).is_dir()
                        else node.module
                    )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvmgate")}
    return found


def layer(name: str) -> str:
    return max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)


def within(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {module_name(p): p for p in PKG.rglob("*.py") if p.name != "_install.py"}


def test_every_import_follows_the_layer_table() -> None:
    broken = []
    for name, path in sorted(MODULES.items()):
        allowed = ALLOWED[layer(name)] | {name}
        for target in sorted(imports(path)):
            if target == "kvmgate" and name.startswith("kvmgate.cli"):
                continue
            if not within(target, allowed):
                broken.append(f"{name} imports {target}")
    assert not broken, "\n".join(broken)


def test_no_verb_module_imports_another() -> None:
    verbs = {n for n in MODULES if n.startswith("kvmgate.verbs.") and n != "kvmgate.verbs.common"}
    for name in verbs:
        assert not (imports(MODULES[name]) & (verbs - {name})), name


def test_the_model_is_pure() -> None:
    """No IO module of the standard library in the model: it is unit-tested without root."""
    io_modules = {"os", "subprocess", "socket", "fcntl", "pwd", "grp", "shutil", "signal", "time"}
    for name, path in MODULES.items():
        if name.startswith("kvmgate.model"):
            tree = ast.parse(path.read_text())
            used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            used |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not used & io_modules, f"{name} imports {used & io_modules}"


def test_no_import_cycles() -> None:
    graph = {n: {t for t in imports(p) if t in MODULES and t != n} for n, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, "cycle: " + " -> ".join([*trail, n, m])
            if m not in state:
                visit(m, [*trail, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def code_lines(path: Path) -> int:
    """Lines of code: no blank lines, comments or docstrings."""
    src = path.read_text()
    doc: set[int] = set()
    for n in ast.walk(ast.parse(src)):
        body = getattr(n, "body", None)
        first = body[0] if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            doc |= set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            code |= set(range(tok.start[0], tok.end[0] + 1))
    return len(code - doc)


START_IMPORTS = (
    "import sys, json; import kvmgate.entry, kvmgate.verbs.lifecycle; print(json.dumps(sorted(m for m in sys.modules)))"
)
ROOT_IO_BUDGET = 1500  # lines of code (docs/security.md, "The root path")


def start_path_modules() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(SRC)!r}); " + START_IMPORTS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out))


def test_the_root_path_of_start_stays_small() -> None:
    """What a start imports, minus the pure model, is the root IO of a start."""
    io_modules = [
        m
        for m in start_path_modules()
        if m.startswith("kvmgate.")
        and not m.startswith("kvmgate.model")
        and m not in ("kvmgate.errors", "kvmgate.paths")
    ]
    total = sum(code_lines(MODULES[m]) for m in io_modules)
    assert total <= ROOT_IO_BUDGET, f"{total} lines of root IO on start: {io_modules}"
    assert "kvmgate.verbs.admin" not in io_modules and "kvmgate.store.define" not in io_modules


def test_the_start_path_loads_no_heavy_modules() -> None:
    """Start-up budget (docs/architecture.md): these cost more than QEMU's own start."""
    heavy = {"asyncio", "argparse", "tomllib", "hashlib", "shutil", "secrets", "ctypes", "subprocess"}
    assert not heavy & set(start_path_modules())


DOC = SRC.parent / "docs" / "security.md"
BEGIN, END = "<!-- root-modules: generated by tests/unit/test_architecture.py -->", "<!-- root-modules end -->"
NOT_ROOT = ("kvmgate.cli", "kvmgate.gated", "kvmgate.pump", "kvmgate._install")  # run as a user, or gated


def module_tables() -> str:
    """docs/security.md's three tables of the code that runs as root."""
    start = set(start_path_modules())
    rows: dict[str, list[str]] = {"io": [], "pure": [], "other": []}
    for name in sorted(MODULES):
        path = MODULES[name]
        if name.startswith(NOT_ROOT) or path.name == "__init__.py":
            continue
        pure = name.startswith("kvmgate.model") or name in ("kvmgate.errors", "kvmgate.paths")
        kind = "other" if name not in start else "pure" if pure else "io"
        rows[kind].append(name)

    def table(title: str, names: list[str]) -> str:
        lines = [f"| {title} | code lines | lines |", "| --- | ---: | ---: |"]
        code = total = 0
        for n in names:
            p = MODULES[n]
            c, t = code_lines(p), len(p.read_text().splitlines())
            code, total = code + c, total + t
            lines.append(f"| `{p.relative_to(SRC.parent)}` | {c} | {t} |")
        lines.append(f"| **total** | **{code}** | {total} |")
        return "\n".join(lines)

    return "\n\n".join(
        [
            table("root IO on `start`", rows["io"]),
            table("pure code on `start` (runs as root, unit-tested without it)", rows["pure"]),
            table("root IO of other verbs and features, not on a plain `start`", rows["other"]),
        ]
    )


def test_security_md_lists_the_root_modules_as_they_are() -> None:
    """Regenerate with: PYTHONPATH=src python -m tests.unit.test_architecture"""
    text = DOC.read_text()
    assert BEGIN in text and END in text
    assert text.split(BEGIN, 1)[1].split(END, 1)[0].strip() == module_tables()


if __name__ == "__main__":
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(f"{head}{BEGIN}\n\n{module_tables()}\n\n{END}{rest.split(END, 1)[1]}")
