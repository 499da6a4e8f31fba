"""
The design rules of SPEC §16 as checks on the source: library functions take
explicit arguments (only the modules that turn parsed flags into calls read
an argparse namespace), no module uses another module's private names, and
the library's import graph has no cycle.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "improved_diffusion").glob("*.py"))
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
# The modules that turn parsed flags into calls (besides scripts/).
FLAG_MODULES = {"train_cli.py", "sample_util.py"}
# The reference's own helper that turns a namespace into a dict (script_util.args_to_dict).
REFERENCE_NAMESPACE_HELPERS = {"args_to_dict"}
# Packages whose private names are not ours to police (torch's _foreach ops, ...).
OTHER_PACKAGES = {"torch", "np", "numpy", "os", "sys", "bf", "dist", "F", "nn", "th", "math", "json"}
# Public methods of namedtuples, whose names start with an underscore.
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def test_only_the_flag_modules_take_parsed_flags():
    offenders = []
    for path in LIBRARY:
        if path.name in FLAG_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            parameters = {a.arg for a in node.args.args + node.args.kwonlyargs}
            if {"args", "namespace"} & parameters and node.name not in REFERENCE_NAMESPACE_HELPERS:
                offenders.append(f"{path.name}:{node.lineno}: {node.name}({', '.join(sorted(parameters))})")
        text = path.read_text()
        offenders += [f"{path.name}: reads vars(args)" for _ in range(text.count("vars(args)"))]
    assert not offenders, "\n".join(offenders)


def _defined_names(tree):
    """Every name a module defines: functions, classes, assigned names and self.attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def _inherited_names(tree):
    """The names defined by the library modules whose classes this module's classes subclass
    (a base class's underscored methods are its interface to its subclasses)."""
    imported_from = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            imported_from.update({a.asname or a.name: node.module for a in node.names})
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in imported_from:
                    module = ROOT / "improved_diffusion" / f"{imported_from[base.id]}.py"
                    names |= _defined_names(ast.parse(module.read_text()))
    return names


def test_no_module_uses_another_module_s_private_names():
    offenders = []
    for path in LIBRARY + SCRIPTS:
        tree = ast.parse(path.read_text())
        own = _defined_names(tree) | _inherited_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("improved")):
                offenders += [f"{path.name}: imports {a.name}" for a in node.names if _private(a.name)]
            elif (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own
                  and node.attr not in NAMEDTUPLE_API and _root(node) not in OTHER_PACKAGES):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_the_library_import_graph_has_no_cycle():
    graph = {}
    for path in LIBRARY:
        imports = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imports |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = imports

    def visit(module, trail):
        assert module not in trail, " -> ".join([*trail, module])
        for imported in graph.get(module, ()):
            visit(imported, [*trail, module])

    for module in graph:
        visit(module, [])
