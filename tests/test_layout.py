"""The shared package's layout: four layers that import only downward, no import circle, no import hidden inside a
function, and `args` stopping at the scripts (read from the source with `ast`, nothing is imported)."""

import ast
from pathlib import Path

import pytest

from mixsyn_utils import LAYERS

PACKAGE = Path(__file__).resolve().parents[1] / "mixsyn_utils"
LAYER_OF = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
# The modules that define and check flags: the only shared code that takes the parsed `args`.
FLAG_MODULES = {"flags", "attack_flags", "training_flags"}


def modules():
    return sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def package_imports(module):
    """[(imported module, whether the import sits inside a function)] of `module`'s imports of this package."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    at_top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.append((node.module.split(".")[0], id(node) not in at_top))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mixsyn_utils."):
            found.append((node.module.split(".")[1], id(node) not in at_top))
    return found


def test_every_module_has_exactly_one_layer():
    listed = [module for members in LAYERS.values() for module in members]
    assert sorted(listed) == modules()
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("module", modules())
def test_a_module_imports_only_its_own_layer_or_those_below(module):
    upward = [imported for imported, _ in package_imports(module) if LAYER_OF[imported] > LAYER_OF[module]]
    assert upward == [], f"{module} ({LAYER_OF[module]}) imports {upward} from a higher layer"


@pytest.mark.parametrize("module", modules())
def test_no_module_imports_the_package_inside_a_function(module):
    hidden = [imported for imported, inside in package_imports(module) if inside]
    assert hidden == [], f"{module} imports {hidden} inside a function (a circle in disguise)"


def test_the_import_graph_has_no_circle():
    graph = {module: {imported for imported, _ in package_imports(module)} for module in modules()}
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError(f"import circle: {' -> '.join(path + [module])}")
        if state.get(module) == "done":
            return
        state[module] = "open"
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        state[module] = "done"

    for module in modules():
        visit(module, [])


@pytest.mark.parametrize("module", sorted(set(modules()) - FLAG_MODULES))
def test_args_stop_at_the_scripts(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    taking_args = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and "args" in [argument.arg for argument in node.args.args + node.args.kwonlyargs]]
    assert taking_args == [], f"{module}: {taking_args} take the parsed args; pass the values they use"


def test_the_layout_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The checks above would catch a module that imports a higher layer from inside a function."""
    (tmp_path / "cli.py").write_text("def f():\n    from .training import start_output_dir\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert package_imports("cli") == [("training", True)]
