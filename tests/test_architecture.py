"""The package's structure: no import circle, and no method file importing another method's."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_edit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    """lit_edit modules imported at module level, ``if TYPE_CHECKING:`` blocks included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = list(tree.body)
    for node in tree.body:
        if isinstance(node, ast.If):
            nodes += node.body + node.orelse
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in known}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_circle():
    modules = _modules()
    graph = {name: _module_level_imports(path, set(modules)) for name, path in modules.items()}
    # a package's __init__ importing its own modules is how a package exports; not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert _cycles(graph) == []


def test_no_method_file_imports_another_methods_file():
    """``methods/<m>.py`` and ``methods/<m>_*.py`` are one method; ``base`` is shared."""
    modules = _modules()
    methods = {n: p for n, p in modules.items() if n.startswith("lit_edit.methods.")}
    for name, path in methods.items():
        own = name.rsplit(".", 1)[1].split("_")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "lit_edit.methods."
            ):
                other = node.module.rsplit(".", 1)[1]
                assert other == "base" or other.split("_")[0] == own, f"{name} imports {other}"
