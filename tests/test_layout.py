"""The package's layout (issue 18): imports point one way, with no cycle, and no module grows past 500 lines.

The rule is one line in `whisperdrop/__init__.py`'s docstring, `cli -> daemon | gpu_runner -> engine,
outputs -> shared`: a package may import the packages to the right of its own layer, never one in its
own layer or to its left. Each package's `__init__` docstring says the same in a `May import:` line.
Imports are read with ast from every module: module level, inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "whisperdrop"
MAX_LINES = 500


def module_name(path: Path) -> str:
    """`whisperdrop/daemon/watch.py` -> `whisperdrop.daemon.watch`; a package's `__init__` is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported whisperdrop module) for every import statement in `module`; `from X import name`
    counts as an import of the module X.name where that is a module, else of X."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found += [(node.lineno, target) for target in targets if target in MODULES and target != module]
    return found


def package_of(module: str) -> str | None:
    """The top-level package a module belongs to (`whisperdrop.daemon.api.app` -> `daemon`); None for
    the root `whisperdrop` and `whisperdrop.__main__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else None


def stated_layers() -> list[list[str]]:
    """The rule line of the root docstring as layers, left to right: [["cli"], ["daemon", "gpu_runner"], ...]."""
    line = next(line for line in ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())).splitlines()
                if line.strip().startswith("cli ->"))
    return [re.findall(r"\w+", layer) for layer in line.split("->")]


def allowed_by_rule() -> dict[str, set[str]]:
    """Package -> the packages it may import, from the stated layers."""
    layers = stated_layers()
    return {package: {later for layer in layers[index + 1:] for later in layer}
            for index, layer in enumerate(layers) for package in layer}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle in `graph`, as the sorted members of each strongly connected part larger than one node
    (or one node importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                part.append(member)
                if member == node:
                    break
            if len(part) > 1 or node in graph.get(node, ()):
                parts.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return parts


def test_every_package_docstring_states_what_it_may_import_as_the_rule_says():
    """Each package under whisperdrop/ is in the rule, and its `__init__` docstring's `May import:` line
    names exactly the packages the rule lets it import."""
    allowed = allowed_by_rule()
    packages = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted(allowed), "a package is missing from the rule in whisperdrop/__init__.py, or gone"
    wrong = {}
    for package in packages:
        docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
        stated = re.search(r"^May import: (.*)$", docstring, re.M)
        names = set(re.findall(r"\w+", stated.group(1))) & set(allowed) if stated else None
        if names != allowed[package]:
            wrong[package] = (names, allowed[package])
    assert wrong == {}, "package: (its docstring's May import, the rule's)"


def test_no_module_imports_against_the_rule():
    """No module imports a package its own package may not import (function-level imports count too)."""
    allowed = allowed_by_rule()
    wrong = []
    for module in MODULES:
        source = package_of(module)
        for line, target in imports_of(module):
            destination = package_of(target)
            if source and destination and destination != source and destination not in allowed[source]:
                wrong.append(f"{MODULES[module].relative_to(REPO)}:{line} imports {target}: "
                             f"{source} may import {', '.join(sorted(allowed[source])) or 'nothing else'}")
    assert wrong == []


def test_no_import_cycle_between_modules():
    """No module imports, directly or through others, a module that imports it back."""
    graph = {module: {target for _line, target in imports_of(module)} for module in MODULES}
    assert strongly_connected(graph) == []


def test_no_import_cycle_between_packages():
    """No package imports, directly or through others, a package that imports it back."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        source = package_of(module) or module
        for _line, target in imports_of(module):
            destination = package_of(target) or target
            if destination != source:
                graph.setdefault(source, set()).add(destination)
    assert strongly_connected(graph) == []


def test_no_module_is_over_500_lines():
    """Every module in whisperdrop/ stays at 500 lines or fewer (split one that grows along its seam)."""
    long = {str(path.relative_to(REPO)): count for path in MODULES.values()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
