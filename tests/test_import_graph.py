"""Imports point down: scripts -> library, quant/ stands alone, utils/ wings are layered, and no package
module imports in a cycle.

The graph is read from the source (every ``import`` statement, including those inside functions), so
a lazy import counts as much as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models", "quant")
SCRIPTS = ("train", "val", "export", "detect")

# utils/ wings (sub-packages) and the other wings each may import; every utils module may import the
# modules at the root of utils/ (boxes, paths, log, checkpoint, qat, ...), which import no wing ("").
WING_IMPORTS = {
    "": set(),
    "data": set(),
    "eval": {"data"},
    "export": {"data", "eval"},
    "detect": {"data", "eval", "export"},
    "train": {"data", "eval"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module a file's import statements name (``from a import b`` also names ``a.b``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside our packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules (library or script) it imports."""
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    known = set(modules) | set(PACKAGES) | set(SCRIPTS)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = _imported_names(ast.parse(path.read_text(encoding="utf-8"), str(path)), package)
        graph[name] = {m for m in imported if m in known and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One example cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_packages():
    graph = import_graph()
    assert "utils.eval.evaluate" in graph and "quant.prepare" in graph and "models.yolo" in graph
    assert "utils.boxes" in graph["utils.eval.evaluate"]
    assert "utils.data.dataset" in graph["utils.train.setup"]


def test_no_library_module_imports_a_script():
    bad = sorted(f"{m} imports {s}" for m, deps in import_graph().items() for s in deps if s in SCRIPTS)
    assert not bad, "library code must not import a root script: " + "; ".join(bad)


def test_quant_imports_neither_models_nor_utils():
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items() if m.split(".")[0] == "quant"
                 for d in deps if d.split(".")[0] in ("models", "utils"))
    assert not bad, "quant/ knows nothing of YOLO: " + "; ".join(bad)


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_models_import_only_models():
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items() if m.split(".")[0] == "models"
                 for d in deps if d.split(".")[0] != "models")
    assert not bad, "models/ builds detectors from yaml alone: " + "; ".join(bad)


def _wing(module: str):
    """The utils/ wing a module belongs to ("" for the root of utils/), None outside utils/ or for utils itself."""
    parts = module.split(".")
    if parts[0] != "utils" or len(parts) == 1:
        return None
    return parts[1] if len(parts) > 2 or parts[1] in WING_IMPORTS else ""


def test_wing_of_a_module():
    assert _wing("utils.boxes") == "" and _wing("utils.data") == "data" and _wing("utils.train.loss") == "train"
    assert _wing("utils") is None and _wing("models.yolo") is None


def test_utils_wings_import_only_the_wings_below():
    bad = []
    for module, deps in import_graph().items():
        wing = _wing(module)
        if wing is None:
            continue
        allowed = {"", wing} | WING_IMPORTS[wing]
        bad += [f"{module} imports {d}" for d in sorted(deps) if _wing(d) not in allowed | {None}]
    assert not bad, "a utils/ wing imports only the root of utils/ and the wings below it: " + "; ".join(bad)


def test_every_utils_folder_is_a_listed_wing():
    folders = {p.parent.name for p in (REPO / "utils").glob("*/__init__.py")}
    assert folders == set(WING_IMPORTS) - {""}, "add a new utils/ wing to WING_IMPORTS with what it may import"


def test_wing_packages_hold_a_docstring_only():
    for init in sorted((REPO / "utils").glob("*/__init__.py")):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), \
            f"{init.relative_to(REPO)}: a wing's __init__.py only describes it (no imports, no code)"
