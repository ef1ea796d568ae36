"""The package uses only the public API of Ray, Tune, MLflow and Optuna (shared/STACK.md, "Ray's
public contract"): a walk over the AST of every module in `mg_ray/` and `jobs/`.

Refused:
- imports from `ray._private`, any `*._internal` module, `ray.experimental`, or of a
  leading-underscore name from one of those libraries;
- any leading-underscore attribute (not a dunder) of anything but `self` / `cls`, and in a class
  that subclasses one of those libraries' classes, a leading-underscore method or attribute on
  `self` (it would override or collide with the library's own);
- a leading-underscore keyword argument (Ray's "hidden / experimental options");
- `getattr` / `setattr` / `hasattr` / `delattr` of a leading-underscore name.

The allow-list is empty. The one documented exception: the numpy names that numpy's own pickles
refer to (`numpy.core.multiarray._reconstruct`, `numpy.core.numeric._frombuffer`), which the
restricted unpickler of `mg_ray/data/annotations.py` must resolve to load a PoseConv3D pickle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("ray", "mlflow", "optuna")
NUMPY_PICKLE_NAMES = {
    ("mg_ray/data/annotations.py", "_reconstruct"),
    ("mg_ray/data/annotations.py", "_frombuffer"),
}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def library_module(module: str) -> bool:
    return module.split(".")[0] in LIBRARIES


def findings(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    imported: dict[str, str] = {}  # local name -> the module it came from
    out: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        out.append(f"{rel}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported[(alias.asname or alias.name).split(".")[0]] = alias.name
                if library_module(alias.name) and (
                    any(map(private, alias.name.split(".")))
                    or alias.name.startswith("ray.experimental")
                ):
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if library_module(node.module):
                if any(map(private, node.module.split("."))) or node.module.startswith(
                    "ray.experimental"
                ):
                    flag(node, f"from {node.module} import ...")
                for alias in node.names:
                    if private(alias.name):
                        flag(node, f"from {node.module} import {alias.name}")

    def library_base(cls: ast.ClassDef) -> bool:
        for base in cls.bases:
            root = base
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and library_module(imported.get(root.id, "")):
                return True
        return False

    subclass_nodes: set[int] = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and library_base(n)):
        for node in ast.walk(cls):
            subclass_nodes.add(id(node))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(node.name):
                flag(node, f"class {cls.name} (a subclass of a library class) defines {node.name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in ("self", "cls") and id(node) not in subclass_nodes:
                continue
            if (rel, node.attr) in NUMPY_PICKLE_NAMES:
                continue
            flag(node, f"attribute {node.attr}" + (f" of {owner}" if owner else ""))
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg and private(keyword.arg):
                    flag(node, f"keyword argument {keyword.arg}")
            if (
                isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and private(node.args[1].value)
                and (rel, node.args[1].value) not in NUMPY_PICKLE_NAMES
            ):
                flag(node, f"{node.func.id}(..., {node.args[1].value!r})")
    return out


def test_no_private_library_api_in_the_package():
    files = sorted([*ROOT.glob("mg_ray/**/*.py"), *ROOT.glob("jobs/*.py")])
    assert len(files) > 30
    found = [line for path in files for line in findings(path)]
    assert not found, "private API in use:\n" + "\n".join(found)


def test_the_walk_finds_what_it_refuses(tmp_path, monkeypatch):
    """The checker itself, on code that does each refused thing once."""
    bad = tmp_path / "mg_ray" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import ray._private.state\n"
        "from ray.train.v2._internal.callbacks import DatasetsCallback\n"
        "from ray.experimental import internal_kv\n"
        "from ray.train import UserCallback\n"
        "from ray.tune.execution import _private_helper\n"
        "class Reporter(UserCallback):\n"
        "    def _create_default_callbacks(self):\n"
        "        return self._queue\n"
        "def f(session, ray):\n"
        "    session._inter_actor_queue = None\n"
        "    ray.init(_node_ip_address='127.0.0.1')\n"
        "    return getattr(session, '_stop_event')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = findings(bad)
    for what in (
        "import ray._private.state",
        "from ray.train.v2._internal.callbacks",
        "from ray.experimental",
        "import _private_helper",
        "defines _create_default_callbacks",
        "attribute _queue of self",
        "attribute _inter_actor_queue of session",
        "keyword argument _node_ip_address",
        "getattr(..., '_stop_event')",
    ):
        assert any(what in line for line in found), (what, found)
    assert len(found) == 9, found
