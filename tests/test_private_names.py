"""No module uses a leading-underscore name of another module: a private name is free to change with its module.

Checked by parsing every .py file under pmf_jax/, train/, bench/ and tests/. In a module M these are violations:

* ``from X import _y`` and ``import X._y`` (X another module);
* ``<expr>._y`` (read, written or deleted) where M itself defines no ``_y``: a module's private function, or the private
  attribute of an object made by another module (``pipe._placed``, ``jitted._cache_size()``);
* ``getattr(<expr>, "_y")`` / ``setattr`` / ``hasattr`` / ``delattr`` / ``monkeypatch.setattr`` with such a name, and
  ``"package.module._y"`` targets of ``setattr`` / ``patch``.

Not violations: dunder names; ``self._y`` / ``cls._y`` / ``super()._y`` (a class and its subclasses share their
privates); names M defines itself (``other._y`` in ``__eq__``); ``__init__.py`` files importing from their own package
(re-exports); pytest fixtures (a fixture's name is how pytest finds it, whatever it is called); and :data:`ALLOWED`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("pmf_jax", "train", "bench", "tests")

# Third-party private names (an attribute, or a dotted module for imports), each with why it cannot be avoided.
ALLOWED = {
    "_replace": "collections.namedtuple's documented API (a leading underscore avoids clashing with field names)",
    "_asdict": "collections.namedtuple's documented API",
    "_fields": "collections.namedtuple's documented API",
    "_dynamo": "torch._dynamo.config is where torch.compile's recompile limit is raised (bench/common.py); torch has "
               "no public alias for it",
    "jax._src.distributed": "the running cluster's coordination-service client (its key-value store and barrier, "
                            "pmf_jax/parallel/distributed.py): jax.distributed exports only initialize/shutdown, and "
                            "multihost_utils' broadcast and sync are device collectives, which the config check "
                            "before compiling and the barrier after a slow compile must not be",
    "jax._src.config": "Pallas' TPU interpret mode (force_tpu_interpret_mode) can only be read from it "
                       "(pmf_jax/models/attention.py); jax exports no reader",
}
STRING_TARGET_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr"})
PATCH_CALLS = frozenset({"setattr", "delattr", "patch"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_names(tree: ast.AST) -> set:
    """Every name a module binds anywhere: defs, classes, assignment targets (names, and attributes of ``self`` /
    ``cls``), arguments, import aliases."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_self(node.value):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def fixture_names(tree: ast.AST) -> set:
    """Functions decorated with ``pytest.fixture`` (or ``@fixture``, with or without arguments)."""
    def is_fixture(decorator) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return ast.unparse(target).split(".")[-1] == "fixture"

    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(is_fixture(d) for d in node.decorator_list)}


def violations(source: str, path: str = "module.py", resolve=None) -> List[str]:
    """The private-name uses of one module, as ``"path:line: text"``.

    Args:
      resolve: ``(module name, importing path) -> parsed tree or None``: looks up a first-party module, so that its
        pytest fixtures may be imported under private names.
    """
    tree = ast.parse(source)
    own = defined_names(tree)
    is_init = Path(path).name == "__init__.py"
    found = []

    def report(node, text):
        found.append(f"{path}:{node.lineno}: {text}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if is_init and node.level > 0:
                continue
            module = "." * node.level + (node.module or "")
            imported = [a.name for a in node.names if _private(a.name) and f"{node.module}.{a.name}" not in ALLOWED]
            if imported and resolve is not None:
                target = resolve(module, path)
                imported = [n for n in imported if target is None or n not in fixture_names(target)]
            for name in imported:
                report(node, f"from {module} import {name}")
            private_module = any(_private(part) for part in (node.module or "").split(".")[1:])
            if private_module and not all(f"{node.module}.{a.name}" in ALLOWED for a in node.names):
                report(node, f"from {module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")[1:]) and alias.name not in ALLOWED:
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own \
                and node.attr not in ALLOWED and not _is_self(node.value):
            report(node, ast.unparse(node))
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else \
                node.func.attr if isinstance(node.func, ast.Attribute) else ""
            strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if name in STRING_TARGET_CALLS and len(node.args) >= 2 and not _is_self(node.args[0]) \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                    and _private(node.args[1].value) and node.args[1].value not in own | set(ALLOWED):
                report(node, ast.unparse(node))
            elif name in PATCH_CALLS and strings and "." in strings[0] and _private(strings[0].rsplit(".", 1)[1]):
                report(node, ast.unparse(node))
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def _is_self(node) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _resolver(root: Path):
    """First-party module lookup: ``pkg.mod`` under the repository root, a sibling of the importing file (tests/ and
    bench/ import their helpers by bare name), or relative (``.mod``)."""
    cache: Dict[Path, Optional[ast.AST]] = {}

    def resolve(module: str, importer: str) -> Optional[ast.AST]:
        here = (root / importer).parent
        level = len(module) - len(module.lstrip("."))
        parts = module.lstrip(".").split(".") if module.strip(".") else []
        bases = [here.parents[level - 2] if level > 1 else here] if level else [root, here]
        for base in bases:
            for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
                if candidate.is_file():
                    if candidate not in cache:
                        cache[candidate] = ast.parse(candidate.read_text())
                    return cache[candidate]
        return None

    return resolve


def repository_violations(root: Path = ROOT, folders: Iterable[str] = FOLDERS) -> List[str]:
    resolve = _resolver(root)
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            found += violations(path.read_text(), str(path.relative_to(root)), resolve)
    return found


def test_no_module_uses_another_module_s_private_names():
    assert repository_violations() == []


def test_the_checker_flags_private_names_of_other_modules(tmp_path):
    (tmp_path / "helpers.py").write_text("import pytest\n\n@pytest.fixture\ndef _shared():\n    return 1\n"
                                         "def _helper():\n    return 2\n")
    source = '''
from helpers import _helper, _shared
import pkg._internal
from pkg.mod import public
import pkg.mod as mod

class Box:
    def __init__(self, other):
        self._mine = other._mine          # its own name, on another object: fine
        self.__dict__                     # dunder: fine

    def size(self):
        return super()._size() + self._mine

def use(pipe, monkeypatch):
    mod._cache = {}
    pipe._placed.clear()
    point._replace(x=1)
    getattr(pipe, "_program")
    getattr(pipe, "_mine")
    monkeypatch.setattr("pkg.mod._loader", None)
    monkeypatch.setattr(mod, "_loader", None)
    return mod.public, mod.__name__
'''
    (tmp_path / "user.py").write_text(source)
    got = violations(source, "user.py", _resolver(tmp_path))
    assert [line.split(": ", 1)[1] for line in got] == [
        "from helpers import _helper", "import pkg._internal", "mod._cache", "pipe._placed",
        "getattr(pipe, '_program')", "monkeypatch.setattr('pkg.mod._loader', None)",
        "monkeypatch.setattr(mod, '_loader', None)"], got
    assert [line.split(":")[1] for line in got][:2] == ["2", "3"]
    # an __init__ re-exporting from its own package is fine; a module of its own names is fine
    assert violations("from .impl import _exported\n", "pkg/__init__.py") == []
    assert violations("def _f():\n    pass\n\n_f()\nx = _f\n") == []
