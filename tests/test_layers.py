"""The folders of `tinygpt/` are layers: a module imports only from its own folder or from folders
on a lower floor, so no import runs back up and no two folders import each other.

Every import is read with `ast`, the ones inside functions included.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinygpt"

# floor of each folder, bottom first: the README's "The folders" lists them in this order
FLOORS = {
    "core": 0,
    "kernels": 1, "text": 1,
    "autograd": 2, "formats": 2,
    "models": 3,
    "inference": 4,
    "hub": 5, "training": 5,
    "finetune": 6, "apps": 6,
    "bench": 7,
    "commands": 8,
}
TOP = len(FLOORS)    # tinygpt/__init__.py and __main__.py: the public API, above every folder
MAX_LINES = 500


def _folder(module: str) -> str | None:
    """'tinygpt.models.gpt' -> 'models'; 'tinygpt' (the package's own API) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _floor(folder: str | None) -> int:
    return TOP if folder is None else FLOORS[folder]


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported module) for every import of tinygpt in a file, relative ones resolved."""
    package = list(path.relative_to(root.parent).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tinygpt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "tinygpt":
                continue
            for alias in node.names:      # `from tinygpt import text` names a folder
                target = f"{module}.{alias.name}"
                is_folder = (root.parent / target.replace(".", "/")).is_dir()
                found.append((node.lineno, target if is_folder else module))
    return found


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_folder_has_a_floor():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FLOORS)
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py"}, "every module lives in a folder"


def _upward(path: Path, root: Path = PACKAGE) -> list[str]:
    """The imports in `path` that reach a folder on the same or a higher floor."""
    rel = path.relative_to(root)
    own = rel.parts[0] if len(rel.parts) > 1 else None
    upward = []
    for line, module in _imports(path, root):
        target = _folder(module)
        if target == own and own is not None:
            continue
        if _floor(target) >= _floor(own):
            upward.append(f"{rel}:{line} imports {module} (floor {_floor(target)} >= {_floor(own)})")
    return upward


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_from_lower_floors(path):
    upward = _upward(path)
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("line, caught", [
    ("from tinygpt.training.train import train", True),      # a floor up, inside a function
    ("from tinygpt import GPT", True),                        # the package API sits above all
    ("from tinygpt.hub import weights", True),
    ("from tinygpt.models import llama", False),              # its own folder
    ("from . import llama", False),
    ("from ..autograd import functional", False),             # a floor down, relative
    ("from ..inference import generate", True),
])
def test_the_checker_sees_upward_imports(tmp_path, line, caught):
    probe = tmp_path / "tinygpt" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    for folder in ("training", "hub", "autograd", "inference"):
        (tmp_path / "tinygpt" / folder).mkdir()
    probe.write_text(f"import numpy\n\n\ndef f():\n    {line}\n")
    assert bool(_upward(probe, tmp_path / "tinygpt")) == caught


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines"
