"""The project's import graph, read from its source with ast (imports inside functions too): no
circle, and no arrow up a floor: kernels/ imports nothing above it, models/ never engine/ or bench/, engine/
never imports bench/ or cli."""
import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def graph() -> dict[str, set[str]]:
    files = [ROOT / "cli.py"] + sorted(p for package in ("kernels", "models", "engine", "bench")
                                       for p in (ROOT / package).rglob("*.py"))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        # a module importing its own package (models.qwen2: `from models import ...`) is no circle
        edges[name] = {target for target in found & modules.keys() if target not in (name, name.split(".")[0])}
    return edges


def test_the_graph_is_read():
    edges = graph()
    assert {"engine.data", "engine.runs", "models"} <= edges["engine.train"] and "kernels.attention" in edges["engine.packing"]


def test_no_import_circle():
    graphlib.TopologicalSorter(graph()).prepare()        # raises CycleError naming the circle


def test_no_arrow_up_a_floor():
    forbidden = {"kernels": {"models", "engine", "bench", "cli"}, "models": {"engine", "bench", "cli"}, "engine": {"bench", "cli"}}
    wrong = [f"{name} imports {target}" for name, targets in graph().items() for target in targets
             if target.split(".")[0] in forbidden.get(name.split(".")[0], ())]
    assert not wrong, wrong


def test_the_transformers_side_imports_nothing_of_ours():
    """Its worker runs with the checkout off sys.path (where `kernels` would be ours, not Hugging Face's)."""
    edges = graph()
    assert edges["bench.transformers_side"] == set() and edges["bench.timing"] == set()
    assert "bench.timing" in edges["bench.common"]


FIND_OURS = """
import importlib.util, pathlib, sys
for name in ("kernels", "models", "engine", "bench", "cli"):
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin and pathlib.Path(spec.origin).is_file():
        print(name, spec.origin, pathlib.Path(spec.origin).read_bytes() == pathlib.Path(sys.argv[1]).joinpath(
            name + ".py" if name == "cli" else name + "/__init__.py").read_bytes())
"""


def test_outside_the_checkout_no_name_is_ours(tmp_path):
    """Installed editable or not (CI installs it editable), the project puts none of its top-level names
    on another folder's sys.path: `import kernels` there is Hugging Face's package or nothing."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FIND_OURS, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                          check=True, env={"PATH": "/usr/bin:/bin"})
    ours = [line for line in done.stdout.splitlines() if line.endswith(" True")]
    assert not ours, ours
