"""Every config key is read somewhere outside pmf_jax/config.py: a key nothing reads is a setting that silently does
nothing, so it must be removed from the schema.

The check parses every .py file under pmf_jax/ and train/ (config.py excluded) and counts a key ``section.field`` as
read when the field is taken from that section:

* ``<anything>.<section>.<field>`` (``cfg.train.lr``, ``run.cfg.model.dtype``);
* ``<name>.<field>`` or ``<name>["field"]`` or ``getattr(<name>, "field")`` where ``<name>`` holds the section: it was
  assigned ``<anything>.<section>`` (``s = cfg.sampling``), is annotated with the section class
  (``mesh: MeshConfig``), or is named ``<section>_cfg`` / ``<section>_config`` (``train_cfg``);
* a method or property of the section class (in config.py) used that way, for the fields its body reads
  (``cfg.data.height_width`` reads ``resolution``; ``dataclasses.asdict(self)`` reads every field).

An attribute of the same name on anything else (``args.image_guidance_scale``) does not count.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Set, Tuple

from pmf_jax import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PY = ROOT / "pmf_jax" / "config.py"


def _section_names(tree: ast.AST, sections: Mapping[str, Sequence[str]], classes: Mapping[str, str]) -> Dict[str, str]:
    """Variable / parameter name -> the section it holds, in one file (names are not scoped: a file is small)."""
    names = {}
    convention = re.compile(rf"^({'|'.join(map(re.escape, sections))})_(cfg|config)$")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Attribute) \
                and node.value.attr in sections:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: node.value.attr for t in targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.arg):
            annotation = ast.unparse(node.annotation).strip("'\"").split(".")[-1] if node.annotation else ""
            match = convention.match(node.arg)
            if annotation in classes:
                names[node.arg] = classes[annotation]
            elif match:
                names[node.arg] = match.group(1)
    return names


def _reads(tree: ast.AST, sections: Mapping[str, Sequence[str]], classes: Mapping[str, str]) -> Set[Tuple[str, str]]:
    """(section, name) pairs read in one parsed file; ``name`` may be a field or a member of the section class."""
    holders = _section_names(tree, sections, classes)

    def section_of(node) -> str:
        if isinstance(node, ast.Attribute) and node.attr in sections:
            return node.attr
        return holders.get(node.id, "") if isinstance(node, ast.Name) else ""

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and section_of(node.value):
            found.add((section_of(node.value), node.attr))
        elif isinstance(node, ast.Subscript) and section_of(node.value) and isinstance(node.slice, ast.Constant):
            found.add((section_of(node.value), str(node.slice.value)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and section_of(node.args[0]) and isinstance(node.args[1], ast.Constant):
            found.add((section_of(node.args[0]), str(node.args[1].value)))
    return found


def section_members(config_source: str, sections: Mapping[str, Sequence[str]],
                    classes: Mapping[str, str]) -> Dict[Tuple[str, str], Set[str]]:
    """(section, method or property name) -> the fields its body reads, from the section classes of config.py."""
    members = {}
    for cls in ast.parse(config_source).body:
        if not isinstance(cls, ast.ClassDef) or cls.name not in classes:
            continue
        section = classes[cls.name]
        for fn in cls.body:
            if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("__"):
                continue
            body = list(ast.walk(fn))
            every = any(isinstance(n, ast.Call) and ast.unparse(n.func).endswith(("asdict", "fields"))
                        and any(isinstance(a, ast.Name) and a.id == "self" for a in n.args) for n in body)
            members[(section, fn.name)] = set(sections[section]) if every else {
                n.attr for n in body if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == "self" and n.attr in sections[section]}
    return members


def unread_keys(sources: Iterable[str], sections: Mapping[str, Sequence[str]], classes: Mapping[str, str],
                members: Mapping[Tuple[str, str], Set[str]] = None) -> List[str]:
    """The ``section.field`` keys that no source reads (sorted)."""
    read = set()
    for source in sources:
        read |= _reads(ast.parse(source), sections, classes)
    for (section, member), fields in (members or {}).items():
        if (section, member) in read:
            read |= {(section, f) for f in fields}
    return sorted(f"{s}.{f}" for s, fields in sections.items() for f in fields if (s, f) not in read)


def _schema() -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    sections = {s: [f.name for f in dataclasses.fields(cls)] for s, cls in config_lib.SECTIONS.items()}
    return sections, {cls.__name__: s for s, cls in config_lib.SECTIONS.items()}


def test_every_config_key_is_read_outside_config_py():
    sections, classes = _schema()
    files = [p for folder in ("pmf_jax", "train") for p in sorted((ROOT / folder).rglob("*.py")) if p != CONFIG_PY]
    members = section_members(CONFIG_PY.read_text(), sections, classes)
    assert unread_keys((p.read_text() for p in files), sections, classes, members) == []


def test_the_checker_flags_an_unread_field():
    sections = {"train": ["lr", "made_up"], "data": ["resolution", "other"]}
    classes = {"TrainConfig": "train", "DataConfig": "data"}
    config_source = ("class DataConfig:\n    @property\n    def size(self):\n        return self.resolution\n"
                     "    def everything(self):\n        return dataclasses.asdict(self)\n")
    members = section_members(config_source, sections, classes)
    assert members == {("data", "size"): {"resolution"}, ("data", "everything"): {"resolution", "other"}}
    check = lambda *sources: unread_keys(sources, sections, classes, members)  # noqa: E731
    everything_else_read = "cfg.data.everything()\n"
    assert check("x = cfg.train.lr\n", everything_else_read) == ["train.made_up"]
    # the same attribute name on something else is no read
    assert check("x = cfg.train.lr + args.made_up + made_up\n", everything_else_read) == ["train.made_up"]
    # the ways a section is held: assigned, annotated, named by convention; attribute, item, getattr
    assert check("t = run.cfg.train\nx = t.made_up + t.lr\n", everything_else_read) == []
    assert check("def f(t: 'TrainConfig'):\n    return t['made_up'] + t.lr\n", everything_else_read) == []
    assert check("def f(train_cfg):\n    return getattr(train_cfg, 'made_up') + train_cfg.lr\n",
                 everything_else_read) == []
    # a member of the section class reads what its body reads
    assert check("x = cfg.train.lr + cfg.train.made_up + cfg.data.size\n") == ["data.other"]
