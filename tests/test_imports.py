"""The package's import graph: no circles, and no imports hidden in functions to dodge one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lowbit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """lowbit modules ``path`` imports at module level, and inside functions."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from lowbit import api`
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("lowbit")]
        for name in names:
            (top if node.col_offset == 0 else nested).add(name)
    return top, nested


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        top, nested = _imports(path)
        graph[name] = {m for m in top | nested if m in modules and m not in (name, "lowbit")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_imports_inside_functions_are_only_the_command_line_s_lazy_ones():
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    hidden = {_module_name(p): sorted(_imports(p)[1] & modules) for p in PACKAGE.rglob("*.py") if "cli" not in p.parts}
    assert {m: i for m, i in hidden.items() if i} == {}


def test_the_subpackages_form_layers():
    """schemes, quantized, data, formats, models, … import one another in one direction only."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    layers: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        layers.setdefault(package(module), set()).update(package(m) for m in imported if package(m) != package(module))
    for imported in list(layers.values()):
        for name in imported:
            layers.setdefault(name, set())
    assert _cycles(layers) == []
