"""The package's module graph: no import cycle, and nothing imports upward (tapo_kernels never
imports trainer or benchmarks)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tapo_kernels"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(node: ast.AST, path: Path) -> set[str]:
    """The modules one import statement of ``path`` names (absolute). ``from . import x``
    names ``x`` only: the package itself is already being imported."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    me = _module(path)
    base = (me if path.name == "__init__.py" else me.rsplit(".", 1)[0]).split(".")
    if node.level:
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    named = {f"{prefix}.{a.name}" for a in node.names}
    return named if node.module is None else named | {prefix}


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module(f) for f in files}
    graph = {}
    for f in files:
        tree = ast.parse(f.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        names = set().union(*(_imports_of(n, f) for n in nodes))
        graph[_module(f)] = {m for m in names if m in modules} - {_module(f)}
    return graph


def _all_imports(path: Path) -> set[str]:
    return set().union(*(_imports_of(n, path) for n in ast.walk(ast.parse(path.read_text()))))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_at_module_level():
    cycle = _cycle(_graph(module_level_only=True))
    assert cycle is None, " -> ".join(cycle)


def test_the_package_never_imports_upward():
    for f in PACKAGE.rglob("*.py"):
        upward = {
            m for m in _all_imports(f) if m.split(".")[0] in ("trainer", "benchmarks", "tests")
        }
        assert not upward, f"{f.relative_to(ROOT)} imports {sorted(upward)}"
