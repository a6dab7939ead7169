"""The factory's import graph: no cycles, and the building blocks never import the orchestration above them.

Read with `ast` from the source (every import statement, at module level or inside a function, counts;
imports under `if TYPE_CHECKING:` do not, since they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Packages that models, compilers and teachers are built from: they may import each other and the small
# shared modules (errors, io, data, metrics, ...), never the recipe or anything that reads one.
BUILDING_BLOCKS = ("factory.models", "factory.targets", "factory.teachers", "factory.align",
                   "factory.coreml_interpreter")
ORCHESTRATION = ("factory.recipe", "factory.build", "factory.lefv", "factory.cli", "factory.report",
                 "factory.compare", "factory.results", "factory.train", "factory.curve", "factory.evaluation",
                 "factory.ablation", "factory.golden",
                 "factory.teacher_eval")
# What the device lab may take from the factory: it runs on lab hosts without torch or the converters.
HARNESS_MAY_IMPORT = {"factory", "factory.gates"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement of `tree` may load (runtime imports only)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every module under `packages` (folders of the repo)."""
    files = {_module_name(p): p for package in packages for p in (REPO / package).rglob("*.py")}
    known = set(files) | {"factory"}
    graph = {}
    for name, path in files.items():
        imported = _imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in known and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_under_type_checking_do_not_count_and_function_level_imports_do():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from factory.recipe import Recipe\n"
                     "def f():\n    from factory.build import build\n")
    imported = _imported(tree, "factory.models.loading", False)
    assert "factory.build" in imported and "factory.recipe" not in imported


def test_the_factory_has_no_import_cycle():
    graph = import_graph("factory")
    assert len(graph) > 50, "the walk found too few modules to mean anything"
    assert cycles(graph) == [], "import cycles (break each by moving the shared code down a layer)"


def test_building_blocks_never_import_the_orchestration():
    graph = import_graph("factory")
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items()
                    if module.startswith(BUILDING_BLOCKS) for target in targets
                    if target.startswith(ORCHESTRATION))
    assert upward == []


def test_the_device_lab_imports_only_the_gate_module_of_the_factory():
    graph = import_graph("mobile_harness", "factory")
    from_factory = {target for module, targets in graph.items() if module.startswith("mobile_harness")
                    for target in targets if target.split(".")[0] == "factory"}
    assert "factory.gates" in from_factory and from_factory <= HARNESS_MAY_IMPORT, from_factory
    assert graph["factory.gates"] <= {"factory"} and graph["factory"] == set(), "the gate module must stay light"


# The generic build, recipe, report and CLI: seed systems plug in (factory.pipelines), they are never named here.
GENERIC = ("factory.build", "factory.recipe", "factory.report", "factory.report_schema", "factory.cli",
           "factory.artifacts", "factory.pipelines", "factory.compare", "factory.results", "factory.stages",
           "factory.gates", "factory.latency")


def test_the_generic_modules_neither_import_nor_name_a_seed_pipeline():
    graph = import_graph("factory")
    imports = sorted(f"{m} imports {t}" for m in GENERIC for t in graph[m] if t.startswith("factory.lefv"))
    assert imports == []
    named = sorted(m for m in GENERIC
                   if "lefv" in (REPO / (m.replace(".", "/") + ".py")).read_text().lower())
    assert named == [], "seed-specific code belongs in its own package, plugged in through factory.pipelines"
