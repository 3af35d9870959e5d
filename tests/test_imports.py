"""Imports: no import cycle among vit_jax modules, vit_jax never imports the `configs`
package (config files are loaded by path), and importing does nothing beyond defining
things: no environment variable set, TensorFlow neither imported nor configured."""

from __future__ import annotations

import ast
import graphlib
import json
import os
import pathlib
import subprocess
import sys

import vit_jax

PACKAGE_DIR = pathlib.Path(vit_jax.__file__).parent
REPO = PACKAGE_DIR.parent


def _modules() -> dict[str, pathlib.Path]:
    """Every module of vit_jax by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports run when the module is imported: not those inside functions, nor those
    under `if TYPE_CHECKING:` (class bodies, `try` and other `if` blocks do run)."""
    found = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, None) or [])

    visit(tree.body)
    return found


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool):
    """The absolute names an import statement of `module` imports (submodules named in a
    `from` import count as themselves)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = (module if is_package else module.rpartition(".")[0]).split(".")
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """vit_jax module -> the vit_jax modules its module-level imports import."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in _module_level_imports(ast.parse(path.read_text())):
            names = _imported_names(node, name, is_package)
            if isinstance(node, ast.ImportFrom):
                # `from pkg import sub`: the submodule when it is one, else the package.
                subs = [n for n in names[1:] if n in modules]
                names = subs if len(subs) == len(names) - 1 else [names[0], *subs]
            for target in names:
                while target and target not in modules:  # `import a.b.c` of a non-module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def test_vit_jax_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert "vit_jax.data.registry" in graph and "vit_jax.config_loader" in graph
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise AssertionError(f"import cycle among vit_jax modules: {cycle}") from None


def test_the_op_registry_imports_no_op_module():
    registry = import_graph()["vit_jax.data.registry"]
    assert not registry & {"vit_jax.data.ops", "vit_jax.data.label_ops", "vit_jax.data.randaug"}
    source = (PACKAGE_DIR / "data" / "registry.py").read_text()
    for node in ast.walk(ast.parse(source)):  # not even inside a function
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("vit_jax.data.") or node.module in {
                "vit_jax.data._tf",
                "vit_jax.data.pp_parse",
            }, node.module


def test_no_vit_jax_source_names_the_configs_package():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # function-level imports included
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = _imported_names(node, name, path.name == "__init__.py")
                assert not any(n == "configs" or n.startswith("configs.") for n in names), (
                    f"{name} imports the configs package (line {node.lineno})"
                )
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("configs."), f"{name}: {node.value!r}"


# Run in a fresh interpreter: records every import of `configs` (and who asked), imports
# every vit_jax module, then loads configs by name, by path and from another directory.
_IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys

asked = []


class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "configs" or name.startswith("configs."):
            frame = sys._getframe(1)  # the first frame outside the import machinery
            while frame and frame.f_globals.get("__name__", "").startswith("importlib"):
                frame = frame.f_back
            asked.append([name, frame and frame.f_globals.get("__name__")])
        return None


sys.meta_path.insert(0, Spy())
# What the libraries vit_jax imports do when imported (jax sets TF_CPP_MIN_LOG_LEVEL) is
# theirs: they are imported first, and the environment is compared from then on.
for library in json.loads(sys.argv[2]):
    try:
        importlib.import_module(library)
    except ImportError:  # an optional one
        pass
environ = dict(os.environ)
import vit_jax

names = [m.name for m in pkgutil.walk_packages(vit_jax.__path__, "vit_jax.")]
for name in names:
    if not name.endswith("__main__"):  # runs the command line
        importlib.import_module(name)
from vit_jax.data import _tf

result = {
    "modules": len(names),
    "environ_changed": sorted(k for k in set(environ) | set(os.environ)
                              if environ.get(k) != os.environ.get(k)),
    "tensorflow_imported": "tensorflow" in sys.modules,
    "tensorflow_configured": _tf.configured(),
}
from vit_jax import config_loader

repo = os.path.dirname(os.path.dirname(vit_jax.__file__))
os.chdir(sys.argv[1])  # another directory: configs/vit.py is not there
by_name = config_loader.load_config("vit:B/16,cifar10,finetune").to_dict()
by_path = config_loader.load_config(os.path.join(repo, "configs/vit.py") + ":B/16,cifar10,finetune")
result["same_config"] = by_name == by_path.to_dict()
result["named"] = config_loader.named_configs()
result["asked_for_configs"] = asked
result["configs_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "configs")
print(json.dumps(result))
"""


def _run(code: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _libraries() -> list[str]:
    """The top-level packages outside vit_jax that vit_jax modules import at module level."""
    found = set()
    for name, path in _modules().items():
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            for imported in _imported_names(node, name, path.name == "__init__.py")[:1]:
                found.add(imported.split(".")[0])
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
    return sorted(found - {"vit_jax", "configs", "__future__"})


def test_importing_every_module_sets_nothing_and_never_imports_configs(tmp_path):
    libraries = _libraries()
    assert "jax" in libraries and "tensorflow" not in libraries
    result = _run(_IMPORT_ALL, str(tmp_path), json.dumps(libraries))
    assert result["modules"] > 40
    assert result["environ_changed"] == []
    assert not result["tensorflow_imported"] and not result["tensorflow_configured"]
    assert result["same_config"] and "vit" in result["named"]
    assert result["asked_for_configs"] == [] and result["configs_imported"] == []


_IMPORT_DATA = r"""
import importlib, json, os, sys

for library in json.loads(sys.argv[1]):  # their own import-time settings are theirs
    try:
        importlib.import_module(library)
    except ImportError:
        pass
environ = dict(os.environ)
import vit_jax.data
from vit_jax.data import _tf

before = {
    "environ_same": dict(os.environ) == environ,
    "tensorflow_imported": "tensorflow" in sys.modules,
    "configured": _tf.configured(),
}
from vit_jax.data._tf import tf

value = int(tf.constant(2) + 1)  # the first use sets TensorFlow up
module = _tf.configure()
after = {
    "value": value,
    "configured": _tf.configured(),
    "same_module": module is sys.modules["tensorflow"] and tf.constant is module.constant,
    "gpus_visible": len(module.config.get_visible_devices("GPU")),
    # 2 (errors only) unless set before (jax sets 1 when imported first)
    "log_level_kept_or_2": os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    == environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
}
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_vit_jax_data_leaves_tensorflow_and_the_environment_alone():
    result = _run(_IMPORT_DATA, json.dumps(_libraries()))
    assert result["before"] == {
        "environ_same": True,
        "tensorflow_imported": False,
        "configured": False,
    }
    after = result["after"]
    assert after["value"] == 3 and after["configured"] and after["same_module"]
    assert after["gpus_visible"] == 0 and after["log_level_kept_or_2"]
