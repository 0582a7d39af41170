"""The package's layers: no import cycles, and dependencies that run one way.

library (``lodo``'s top-level modules) ← baselines and tasks (``optimizers``, ``tasks``)
← framework (``lodo.experiment``, the ``python -m lodo.run``/``lodo.aggregate`` entry points,
the GA sweeper) ← scripts. Read from the source with ``ast``, function-level imports included,
so no module is imported (and no TensorFlow is loaded) to check it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lodo", "optimizers", "tasks", "hydra_plugins")
ENTRY_POINTS = ("lodo.run", "lodo.aggregate")  # command lines: they start the framework


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name an ``import`` in the file can refer to (absolute and relative, at any depth)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def project_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for target in imported_names(path, name):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layer(name: str) -> str:
    if name.startswith(("lodo.experiment", "hydra_plugins")) or name in ENTRY_POINTS:
        return "framework"
    if name.startswith(("optimizers", "tasks")):
        return "plugins"
    return "library"


def test_no_import_cycles():
    graph = project_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            # A package's __init__ and its own submodules importing each other is not a cycle between concepts.
            root = min(component, key=len)
            if len(component) > 1 and not all(m.startswith(root + ".") or m == root for m in component):
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


RANK = {"library": 0, "plugins": 1, "framework": 2}


@pytest.mark.parametrize("lower", ["library", "plugins"])
def test_dependencies_run_one_way(lower):
    graph = project_graph()
    upward = sorted(f"{source} -> {target}" for source, targets in graph.items() if layer(source) == lower
                    for target in targets if RANK[layer(target)] > RANK[lower])
    assert upward == []


def test_the_optimizer_library_needs_no_experiment_tooling():
    """``from lodo import LODO`` in a user's project pulls in TensorFlow and Keras, nothing of Hydra or the tasks."""
    foreign = ("hydra", "omegaconf", "pandas", "matplotlib", "tqdm", "yaml")
    found = []
    for name, path in modules().items():
        if layer(name) == "library":
            found += [f"{name} imports {m}" for m in imported_names(path, name) if m.split(".")[0] in foreign]
    assert found == []


def test_every_config_folder_ships_in_the_wheel():
    """pyproject.toml lists the configs/ folders one by one (setuptools ships a folder it is told about)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(("lodo_configs", *p.relative_to(ROOT / "configs").parts)).rstrip(".")
               for p in (ROOT / "configs").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    folders.add("lodo_configs")
    assert folders <= set(setup["packages"])
    with_yaml = {f for f in folders if any((ROOT / "configs" / Path(*f.split(".")[1:])).glob("*.yaml"))}
    assert with_yaml == {k for k, v in setup["package-data"].items() if k.startswith("lodo_configs") and "*.yaml" in v}


def module_level_imports(path: Path, name: str) -> set[str]:
    """What a module imports when it is imported (statements outside functions and classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
        else:
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return out


def test_a_bad_command_line_is_refused_before_tensorflow_loads():
    """Everything ``python -m lodo.run`` imports before it has checked the settings is free of TensorFlow and
    Keras (importing them takes seconds); cli.main imports the training side in one place, afterwards."""
    mods = modules()
    seen, todo, heavy = set(), ["lodo.run", "hydra_plugins.lodo_ga_sweeper"], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target in module_level_imports(mods[name], name):
            if target.split(".")[0] in ("tensorflow", "keras", "tensorflow_datasets"):
                heavy.append(f"{name} imports {target}")
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                todo.append(target)
                todo.extend(p for p in mods if target.startswith(p + ".") and p != target)  # parent packages run too
    assert "lodo.experiment.config" in seen and "lodo.experiment.registry" in seen
    assert heavy == []
