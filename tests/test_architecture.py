"""The package contract of docs/architecture.md, checked from the source (imports at any depth,
including those inside functions, which would otherwise hide a cycle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detector", "pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported project module, imported names, line) for every import statement in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module, not a name
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if subs:
                found.extend((s, [], node.lineno) for s in subs)
                names = [n for n in names if f"{base}.{n}" not in modules]
                if not names:
                    continue
            found.append((base, names, node.lineno))
    out = []
    for target, names, line in found:
        while target and target not in modules:  # `import pipeline.data.loader` -> nearest module
            target = target.rpartition(".")[0]
        if target:
            out.append((target, names, line))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, _, _ in imports_of(path, modules):
            if target != mod and not mod.startswith(target + "."):  # a package's own __init__ is not a cycle
                graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_detector_and_pipeline():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_detector_imports_nothing_from_pipeline_nor_io_libraries():
    modules = project_modules()
    for mod, path in modules.items():
        if not mod.startswith("detector"):
            continue
        text = path.read_text()
        for target, _, line in imports_of(path, modules):
            assert not target.startswith("pipeline"), f"{path}:{line} imports {target}"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] not in ("ray", "mlflow", "pyarrow", "pycocotools"), \
                        f"{path}:{node.lineno} imports {n}"


def test_no_private_names_imported_across_modules():
    modules = project_modules()
    for path in [*modules.values(), *(ROOT / "jobs").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for target, names, line in imports_of(path, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path.relative_to(ROOT)}:{line} imports private {private} from {target}"


@pytest.mark.parametrize("folder", ["jobs", "bench"])
def test_jobs_and_bench_import_only_the_packages(folder):
    """Scripts import pipeline/ and detector/, never each other (bench may import the test reference loops)."""
    scripts = {p.stem for p in (ROOT / folder).glob("*.py")}
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                top = node.names[0].name.split(".")[0]
            else:
                continue
            assert top not in scripts, f"{path.relative_to(ROOT)}:{node.lineno} imports another script ({top})"


# The layers of docs/architecture.md's package map, lowest first (a prefix names a package).
LAYERS = [
    ("detector",),
    ("pipeline.progress", "pipeline.verdict", "pipeline.schedule", "pipeline.optim", "pipeline.tracking",
     "pipeline.training.store"),
    ("pipeline.synthetic", "pipeline.data"),
    ("pipeline.evaluation", "pipeline.tta", "pipeline.checkpoint", "pipeline.resources", "pipeline.environment",
     "pipeline.cli"),
    ("pipeline.inference", "pipeline.submission", "pipeline.inference_cli"),
    ("pipeline.training",),
    ("pipeline.ablation", "pipeline.cluster", "pipeline.rehearsal_provider"),
]


def layer_of(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    missing = [m for m in project_modules() if m != "pipeline" and layer_of(m) is None]
    assert not missing, f"modules missing from docs/architecture.md's layers: {missing}"


def test_imports_never_go_up_a_layer():
    graph = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph.items() if m != "pipeline" for t in targets
              if t != "pipeline" and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


LAZY_PACKAGES = ("detector", "pipeline.data", "pipeline.training")


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_exports_resolve_to_what_they_name(package):
    """A package's torch-backed names load on first use (PEP 562). Importing a submodule binds its
    name on the package, so a lazy name must never be a submodule's (``pipeline.data.collate`` was
    the module, not the function, once ``pipeline.data.loader`` had run): each name must resolve to
    the object its module defines, whatever was imported before."""
    import importlib

    pkg = importlib.import_module(package)
    for name, module in pkg.TORCH_NAMES.items():
        submodule = importlib.import_module(f"{package}.{module}")
        expected = submodule if name == module else getattr(submodule, name)
        assert getattr(pkg, name) is expected, f"{package}.{name} is not {module}.{name}"
