"""The package's shape: every module imports alone, the import graph has no cycle, no module reaches
into another's private names, and committed results hold no absolute path of the machine that made them."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moa_train"


def module_names() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module of this package, names taken from it) for every import, nested ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("moa_train")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("moa_train"):
                continue
            for alias in node.names:  # `from .pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((sub, []) if sub in modules else (target, [alias.name]))
    return found


def test_no_module_imports_a_private_name_of_another():
    modules = module_names()
    offences = [f"{name} imports {target}.{taken}" for name, path in modules.items()
                for target, names in imports_of(name, path, modules) for taken in names
                if taken.startswith("_") and target != name]
    assert offences == []


def test_the_import_graph_is_acyclic():
    modules = module_names()
    graph = {name: {t for t, _ in imports_of(name, path, modules) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert state and all(v == 2 for v in state.values())


ISOLATED_IMPORTS = r"""
import importlib, sys
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "moa_train" or m.startswith("moa_train.")]:
        del sys.modules[loaded]  # each module from scratch: none may rely on another having been imported
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_in_isolation():
    modules = sorted(name for name in module_names() if not name.startswith("moa_train.conf"))
    modules.remove("moa_train.__main__")  # importing it runs moa-train
    done = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *modules], capture_output=True, text=True,
                          timeout=300)
    assert len(modules) > 20 and done.returncode == 0, done.stdout + done.stderr[-2000:]


ABSOLUTE_PATH = re.compile(r"(?<![\w.])(/root/|/home/[^/\s]+/|/work/|/tmp/|/Users/[^/\s]+/)")


def test_committed_docs_hold_no_absolute_machine_path():
    listed = subprocess.run(["git", "ls-files", "docs", "README.md"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    offenders = []
    for relative in listed.stdout.split():
        path = ROOT / relative
        if path.suffix in {".png", ".jpg"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ABSOLUTE_PATH.search(line) or str(ROOT) in line or os.path.expanduser("~/") in line:
                offenders.append(f"{relative}:{number}: {line.strip()[:120]}")
    assert offenders == []


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert "docs/design.md" in local
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_readme_layout_names_every_module():
    """README's Layout section lists each module of the package (and nothing that is gone)."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 4)] if "\n## " in layout[4:] else layout
    named = set(re.findall(r"([a-z_]+\.py)", layout))
    files = {p.name for p in PACKAGE.rglob("*.py") if p.name not in {"__init__.py", "__main__.py"}}
    assert named - files == set(), "README names modules that do not exist"
    assert files - named == set(), "README's layout misses modules"


def test_the_cli_and_the_config_schema_load_without_torch():
    """`moa-train --help`, config errors and a locked run directory answer before torch is imported (about 1 s
    of the CLI's startup on the CI machine): the torch-backed modules load when training starts."""
    import subprocess
    import sys

    probe = ("import sys, moa_train.cli, moa_train.config, moa_train.ffn.registry; "
             "moa_train.config.register_configs(); "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    from moa_train.ffn import Gates  # the lazy names still resolve

    assert Gates.__name__ == "Gates"
