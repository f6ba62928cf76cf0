"""The package's layering, read from its source: the solver below the layer-parallel core, the
core below the features, the features below the application, no import cycle, and no module
reaching into another module's private names (docs/architecture.md)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "xbraid_transformers"
PACKAGE = "xbraid_transformers"

# (layer, module-name prefixes); a module belongs to the first layer with a matching prefix.
LAYERS = [
    ("base", ("version", "formatting")),     # what every module may use: no package imports
    ("solver", ("mgrit",)),
    ("core", ("core", "perf")),
    # the features, in three floors: what everything may use (data, processes), what trains a
    # stack (drop-in modules, the controller, multilevel training, diagnostics), and what builds
    # whole models from them (our models, other libraries' models)
    ("features: data and processes", ("data", "distributed")),
    ("features: training", ("nn", "control", "multilevel", "diagnostics")),
    ("features: models", ("models", "adapters")),
    ("app", ("app", "cli", "demo")),
    ("facade", ("",)),           # the package __init__: re-exports only
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}


def layer_of(module: str) -> str:
    inner = module[len(PACKAGE) + 1:]
    for name, prefixes in LAYERS:
        if any(inner == p or inner.startswith(p + ".") for p in prefixes if p) or \
                (prefixes == ("",) and inner == ""):
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def imported_module(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module an ``import from`` statement of ``module`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _dynamic_import(module: str, node: ast.Call):
    """The module named by ``importlib.import_module("...")`` or ``__import__("...")`` with a
    constant name (relative names against ``module``'s package), else None."""
    func = ast.unparse(node.func)
    if func not in ("importlib.import_module", "import_module", "__import__") or not node.args:
        return None
    name = node.args[0]
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        return None
    name = name.value
    if name.startswith("."):
        level = len(name) - len(name.lstrip("."))
        package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        base = package.split(".")[: len(package.split(".")) - level + 1]
        name = ".".join(base + [name.lstrip(".")] if name.lstrip(".") else base)
    return name


def imports(module: str):
    """(target module, line) of every import of the package by ``module``, lazy and dynamic
    ones (``importlib.import_module``, ``__import__``) too."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = imported_module(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        elif isinstance(node, ast.Call) and _dynamic_import(module, node):
            targets = [_dynamic_import(module, node)]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in MODULES:     # a name inside a module
                    target = target.rsplit(".", 1)[0]
                yield target, node.lineno


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m}:{line} ({layer_of(m)}) imports {t} ({layer_of(t)})"
              for m in MODULES for t, line in imports(m) if RANK[layer_of(t)] > RANK[layer_of(m)]]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t, _ in imports(m) if t != m} for m in MODULES}
    # A package's __init__ re-exports its own submodules: that is containment, not a cycle.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_private_names(tree: ast.AST) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _private(n)}


DEFINED = {m: _defined_private_names(tree) for m, tree in TREES.items()}


def _attribute_reads(tree: ast.AST):
    """(line, object expression, name) of every attribute read: ``obj.name`` and the
    constant-name ``getattr``/``hasattr``/``setattr``/``delattr(obj, "name")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.value, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            yield node.lineno, node.args[0], node.args[1].value


def private_access(module: str):
    """Private names of other modules of the package that ``module`` imports or reads. A read
    of a private name that another module defines counts even when ``module`` defines the same
    name too (the object read may be the other module's); reads through ``self``/``cls`` are a
    class's own."""
    tree = TREES[module]
    others = set().union(*(names for m, names in DEFINED.items() if m != module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = imported_module(module, node)
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                for alias in node.names:
                    if _private(alias.name):
                        yield f"{module}:{node.lineno} imports {base}.{alias.name}"
    for line, obj, name in _attribute_reads(tree):
        on_self = isinstance(obj, ast.Name) and obj.id in ("self", "cls")
        if _private(name) and not on_self and name in others:
            yield f"{module}:{line} reads .{name}"


def test_no_module_touches_another_modules_private_names():
    found = [line for m in MODULES for line in private_access(m)]
    assert not found, "cross-module private access:\n" + "\n".join(found)


VIOLATIONS = {
    # a features module importing from a higher floor of the features
    "data": ("from ..control import AdaptiveController\n", "imports up", "control"),
    # a private name read through getattr
    "mgrit": ("def f(stack):\n    return getattr(stack, '_parallel')\n", "reads ._parallel", None),
    # an upward import by importlib
    "core": ("import importlib\nTrainer = importlib.import_module('xbraid_transformers.app.trainer')\n",
             "imports up", "app.trainer"),
    # another module's private name, read by a module that defines the same name
    "distributed": ("class Mine:\n    def __init__(self):\n        self._parallel = 1\n"
                    "def f(stack):\n    return stack._parallel\n", "reads ._parallel", None),
}


@pytest.mark.parametrize("package", sorted(VIOLATIONS))
def test_the_scans_see_each_kind_of_violation(package):
    """The checks themselves can fail: each made-up module below breaks one rule, and the
    scans catch it."""
    source, kind, target = VIOLATIONS[package]
    module = f"{PACKAGE}.{package}.made_up"
    MODULES[module] = ROOT / package / "made_up.py"
    TREES[module] = ast.parse(source)
    DEFINED[module] = _defined_private_names(TREES[module])
    try:
        if kind == "imports up":
            upward = [t for t, _ in imports(module) if RANK[layer_of(t)] > RANK[layer_of(module)]]
            assert upward == [f"{PACKAGE}.{target}"]
        else:
            assert [line.split(" ", 1)[1] for line in private_access(module)] == [kind]
    finally:
        del MODULES[module], TREES[module], DEFINED[module]


# ---------------------------------------------------------------------- the public surface
PUBLIC = sorted(m for m in MODULES if not any(part.startswith("_") for part in m.split(".")))


def _listed_names(tree: ast.Module):
    """The names of ``__all__`` (a literal list or tuple of strings), or None without one."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), \
                "__all__ must be a literal list of strings"
            return list(value)
    return None


def _bound_names(tree: ast.Module) -> set:
    """Names a module binds at its top level (definitions, assignments, imports) and the names
    its module ``__getattr__`` hands out lazily (the string constants it compares to)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if node.name == "__getattr__":
                names |= {c.value for c in ast.walk(node)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_module_lists_its_public_names(module):
    """A public module (no part of its name starts with "_") says what it offers in
    ``__all__``: names it binds, none private, none twice."""
    listed = _listed_names(TREES[module])
    assert listed is not None, f"{module} defines no __all__"
    assert len(set(listed)) == len(listed), f"{module}: __all__ names a name twice"
    assert not [n for n in listed if _private(n)], f"{module}: __all__ lists private names"
    missing = sorted(set(listed) - _bound_names(TREES[module]))
    assert not missing, f"{module}: __all__ lists names it does not define or import: {missing}"


def test_the_public_surface_check_sees_a_missing_or_wrong_all():
    """The check above can fail: a module without ``__all__``, one that lists a name it does not
    bind, and one that lists a private name are each refused."""
    cases = {"": "defines no __all__", "__all__ = ['gone']\n": "does not define",
             "def _hidden(): pass\n__all__ = ['_hidden']\n": "lists private names"}
    module = f"{PACKAGE}.core.made_up"
    for source, message in cases.items():
        TREES[module] = ast.parse(source)
        try:
            with pytest.raises(AssertionError, match=message):
                test_every_public_module_lists_its_public_names(module)
        finally:
            del TREES[module]
