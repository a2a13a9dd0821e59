"""The module graph of src/fasttune: every module imports on its own, and no import cycle exists, counting the
imports inside functions (a lazy import hides a cycle from the interpreter, not from a reader)."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fasttune"

# Edges (importer, imported) allowed to close a cycle, each with its reason. Keep it empty where possible: move the
# shared helper below both modules instead.
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, importer: str, is_package: bool, modules: dict) -> set[str]:
    """The fasttune modules an import statement runs: the module named, each package above it, and for
    `from package import name` the submodule `name` when there is one."""
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        named = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in named:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    # The importer's own packages are already being imported when it runs: not an edge.
    own = importer.split(".")
    return out - {".".join(own[:i]) for i in range(1, len(own) + 1)}


def import_graph() -> dict[str, dict[str, int]]:
    """{importer: {imported: line of the first import}} over every import statement, at any depth."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, path.name == "__init__.py", modules):
                    edges.setdefault(target, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search over the modules in name order)."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if (node, nxt) in ALLOWED_CYCLE_EDGES:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "fasttune.models.causal_lm" in graph["fasttune.models.loading"]  # module level
    assert "fasttune.models.fallback" in graph["fasttune.models.loading"]  # inside a function
    assert "fasttune.errors" in graph["fasttune.data.encode"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = "\n".join(f"  {a} -> {b}  (line {graph[a][b]} of {a})"
                          for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle:\n{steps}\nMove what both need into a module below them.")
    unused = [edge for edge in ALLOWED_CYCLE_EDGES if edge[1] not in graph.get(edge[0], {})]
    assert not unused, f"allow-listed edges that no longer exist: {unused}"


# Layers: what a package's modules never import, even inside a function. Kernels know tensors, not modules; models
# and adapters are saved and sharded through helpers below training (fasttune.sharding).
NEVER_IMPORTS = {
    "fasttune.kernels": ("fasttune.models", "fasttune.peft", "fasttune.train", "fasttune.export", "fasttune.data"),
    "fasttune.peft": ("fasttune.train", "fasttune.export"),
    "fasttune.models": ("fasttune.train",),
    "fasttune.data": ("fasttune.models", "fasttune.train"),
}


def test_layers():
    wrong = [f"{a} -> {b} (line {line})" for a, edges in import_graph().items() for b, line in edges.items()
             for layer, banned in NEVER_IMPORTS.items()
             if (a == layer or a.startswith(layer + ".")) and any(b == x or b.startswith(x + ".") for x in banned)]
    assert not wrong, "imports across layers:\n" + "\n".join(wrong)


def test_each_module_imports_alone():
    """Each module imports in a fresh set of fasttune modules (third-party ones stay loaded, to keep this fast), so
    no module relies on another having been imported first."""
    script = textwrap.dedent("""
        import importlib, sys, traceback
        failed = []
        for name in sys.argv[1:]:
            for loaded in [m for m in sys.modules if m == "fasttune" or m.startswith("fasttune.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except BaseException:
                failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script, *_modules()], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, f"modules that do not import on their own:\n{result.stdout}{result.stderr}"
