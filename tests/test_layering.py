"""The package graph points one way: export is the bottom layer, runtime sits on export only, mrp_pass on both;
and no module imports itself back through others."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("package", "forbidden"), [("export", ("mrp_pass", "runtime")), ("runtime", ("mrp_pass",))])
def test_layers_import_downwards_only(package, forbidden):
    """A fresh interpreter imports the package and every module of it; none may load a layer above it."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {package} loaded {out.stdout.strip()}"


PACKAGES = ("mrp_pass", "export", "runtime")


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of PACKAGES (a package by its __init__)."""
    names = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports, at any level of its code (inside functions too): a lazy
    import closes a circle as surely as one at the top, only later."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                return [*path[path.index(other):], other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    """No module of mrp_pass, export or runtime imports itself back through others, lazily or not (a package's
    __init__ importing its modules is not counted as their importing the package: they name the module)."""
    root = Path(__file__).resolve().parents[1]
    modules = _module_names(root)
    graph = {name: set(_imported(name, path, modules)) for name, path in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
