"""The layers: `personalize` (the science) runs without Ray, MLflow or the packages above it; no module imports
another that (directly or through others) imports it back; each package imports only the ones below it."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["personalize", "microworld", "pipelines", "tuning", "cluster"]  # each may import only those before it
# microworld is the built-in world: its model is built with personalize, its quality bench runs pipelines' batches
ALLOWED_UP = {("microworld.quality", "pipelines")}


def runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only, never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (lazy imports in functions included)."""
    modules = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
               for layer in LAYERS for f in (ROOT / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_projects_modules():
    assert cycles(project_imports()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_package_imports_only_the_layers_below_it():
    upward = []
    for module, targets in project_imports().items():
        rank = LAYERS.index(module.split(".")[0])
        for target in targets:
            package = target.split(".")[0]
            if LAYERS.index(package) > rank and (module, package) not in ALLOWED_UP:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_every_personalize_module_imports_with_ray_mlflow_and_the_upper_layers_blocked():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        for blocked in ("ray", "mlflow", "pipelines", "tuning", "cluster"):
            sys.modules[blocked] = None  # any import of it now raises ImportError
        import personalize
        names = [m.name for m in pkgutil.walk_packages(personalize.__path__, "personalize.")]
        for name in names:
            importlib.import_module(name)
        assert not any(k == "ray" or k.startswith(("ray.", "mlflow")) for k, v in sys.modules.items() if v is not None)
        print(len(names))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 20
