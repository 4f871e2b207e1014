"""The layout: the library never imports a command, and a command defines no model, data set,
metric or loop (it parses arguments and calls the library)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "deformable"
LIBRARY = ("ops", "nn", "models", "data", "engine", "analysis", "experiments", "export.py")
COMMANDS = sorted((PACKAGE / "commands").glob("*.py")) + [PACKAGE / "cli.py"]


def modules(*names: str) -> list[pathlib.Path]:
    found = []
    for name in names:
        path = PACKAGE / name
        found += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return found


def imported(path: pathlib.Path) -> set[str]:
    """Every module an import statement of the file names (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", modules(*LIBRARY), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_library_imports_no_command(path):
    commands = {n for n in imported(path) if n.startswith(("deformable.commands", "deformable.cli"))}
    assert not commands, f"{path.name} imports {sorted(commands)}"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_command_defines_no_model_data_set_metric_or_loop(path):
    tree = ast.parse(path.read_text())
    classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert not classes, f"{path.name} defines classes {classes}: they belong to the library"
    # the pieces of a model, a training or evaluation loop, or a metric: layers, optimisers,
    # loaders, losses, gradients, predictions
    forbidden = {"Module", "DataLoader", "Dataset", "optim", "backward", "no_grad", "cross_entropy",
                 "zero_grad", "argmax", "state_dict", "load_state_dict"}  # fmt: skip
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not used & forbidden, f"{path.name} uses {sorted(used & forbidden)}"
