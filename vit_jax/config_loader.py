"""From `--config=<spec>` and `--config.<field>=<value>` to one locked, consistent config.

* Specs: a named config in the shipped configs folder (`vit`, `vit:B/16,cifar10,finetune`)
  or a file (`configs/vit.py:B/16,cifar10,finetune`, found in the configs folder when the
  path does not exist, so it works from any directory). Config files are loaded by path,
  never imported as the `configs` package (which imports vit_jax: importing it from here
  would make the two packages import each other). They are loaded as modules of a private
  package whose folder is the configs folder, so `from . import recipes` in a config file
  (a shipped one, or a user's copy elsewhere) finds the shipped recipes.
* Overrides are parsed with the field's own type. Syntax: `true/false` for booleans,
  `None` for optional fields (those whose default is None), `1,5,10` or `(1, 5, 10)` for
  tuples (`()` for the empty tuple), Python literals parsed with `ast.literal_eval` (never
  `eval`) for tuples of pairs: `"(('head', 10.0),)"`.
* Sources and derived fields: `model_name`, `dataset`, `recipe` and `model.img_size`
  determine the rest, so overriding one rebuilds the config from them (through the config
  module's `build`) before the other overrides apply, whatever their order. Fields derived
  from them (`data.image_size`, `data.name`) are refused with the field to set instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import ml_collections

from vit_jax.errors import UserError

SOURCES = ("model_name", "dataset", "recipe", "model.img_size")
DERIVED = {"data.image_size": "model.img_size", "data.name": "dataset"}
DEFAULT_SPEC = "vit"
_TRUE, _FALSE, _NONE = ("true", "yes", "1"), ("false", "no", "0"), ("none", "null")
# Tuple fields whose default is empty, so that it cannot give the type of their items.
TUPLE_ITEM_TYPES = {"model.patch_sizes": int}


# The configs folder: installed next to the vit_jax package (setup.py's find_packages
# includes "configs"), in a checkout (editable install) as in site-packages.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The private package config files are loaded into (its folder is CONFIGS_DIR).
_PACKAGE = "_vit_jax_configs"
_USER_MODULE = f"{_PACKAGE}._user_config"


def named_configs() -> list[str]:
    """The configs shipped in the configs folder (usable as `--config=<name>`)."""
    if not os.path.isdir(CONFIGS_DIR):
        return []
    return sorted(m.name for m in pkgutil.iter_modules([CONFIGS_DIR]) if m.name not in ("recipes",))


def _package() -> ModuleType:
    """The private package of the configs folder, created (by path) on first use."""
    package = sys.modules.get(_PACKAGE)
    if package is None:
        spec = importlib.util.spec_from_file_location(
            _PACKAGE,
            os.path.join(CONFIGS_DIR, "__init__.py"),
            submodule_search_locations=[CONFIGS_DIR],
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[_PACKAGE]
            raise
    return package


def _load_file(module_name: str, path: str) -> ModuleType:
    """Executes the config file at `path` as the module `module_name` of the package."""
    _package()
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # what the file imports relatively may import it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _named_module(stem: str) -> ModuleType:
    name = f"{_PACKAGE}.{stem}"
    module = sys.modules.get(name)
    if module is None:
        module = _load_file(name, os.path.join(CONFIGS_DIR, f"{stem}.py"))
    return module


def _is_shipped(path: str) -> bool:
    shipped = os.path.join(CONFIGS_DIR, os.path.basename(path))
    return os.path.isfile(shipped) and os.path.samefile(path, shipped)


def load_module(spec: str) -> tuple[ModuleType, str]:
    """The config module a spec names, and the argument after its first ':'."""
    name, _, arg = (spec or DEFAULT_SPEC).partition(":")
    stem = os.path.splitext(os.path.basename(name))[0]
    if os.path.isfile(name):
        if _is_shipped(name):
            return _named_module(stem), arg
        return _load_file(_USER_MODULE, name), arg
    if stem in named_configs():
        return _named_module(stem), arg
    raise UserError(
        f"--config={spec}: no file {name!r} and no named config {stem!r}; named configs: "
        f"{', '.join(named_configs())} (e.g. --config=vit:B/16,cifar10,finetune)"
    )


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked config for `spec` with `overrides` ("field=value", no `--config.`)."""
    module, arg = load_module(spec)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError) as e:
        raise UserError(f"--config={spec}: {e}") from None
    pairs = [_split_override(text) for text in overrides]
    for field, _ in pairs:
        _check_field(config, field)
    sources = {f: v for f, v in pairs if f in SOURCES}
    if sources:
        config = _rebuild(module, spec, config, sources)
    for field, text in pairs:
        if field in SOURCES:
            continue
        if field in DERIVED:
            raise UserError(
                f"config.{field} follows config.{DERIVED[field]}; "
                f"set --config.{DERIVED[field]}=... instead"
            )
        _check_field(config, field)
        set_field(config, field, text)
    return config


def _split_override(text: str) -> tuple[str, str | None]:
    field, equals, value = text.partition("=")
    return field.strip(), value if equals else None


def _rebuild(module, spec: str, config, sources: dict[str, str | None]):
    """The config built again from its sources, with the overridden ones changed."""
    build = getattr(module, "build", None)
    if build is None or build.__module__ != module.__name__:  # its own, not an import
        raise UserError(
            f"config.{next(iter(sources))}: the config {spec!r} has no build() to derive the "
            "other fields from it; edit the config file instead"
        )
    values = {f: parse_value(config, f, text) for f, text in sources.items()}
    kwargs = {
        "model_name": values.get("model_name", config.model_name),
        "dataset": values.get("dataset", config.dataset),
        "recipe": values.get("recipe", config.recipe),
        "img_size": values.get("model.img_size"),
    }
    try:
        return build(**kwargs)
    except (ValueError, KeyError) as e:
        field = next(f for f in SOURCES if f in sources)
        raise UserError(f"config.{field}: {e}") from None


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every leaf (every field that is not a group of fields)."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaf_paths(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _parent(config: ml_collections.ConfigDict, field: str):
    *parents, leaf = field.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    return target, leaf


def _is_leaf(config: ml_collections.ConfigDict, field: str) -> bool:
    """Whether `field` names a leaf (one of `leaf_paths`), without listing them all."""
    target = config
    for part in field.split("."):
        if not isinstance(target, ml_collections.ConfigDict) or part not in target:
            return False
        target = target[part]
    return not isinstance(target, ml_collections.ConfigDict)


def _check_field(config: ml_collections.ConfigDict, field: str) -> None:
    if _is_leaf(config, field):
        return
    paths = list(leaf_paths(config))
    if any(p.startswith(field + ".") for p in paths):
        example = next(p for p in paths if p.startswith(field + "."))
        raise UserError(
            f"config.{field} is a group of fields; override one of them, e.g. "
            f"--config.{example}=..."
        )
    if field.startswith("model.") and "." not in field[len("model.") :]:
        settings = ", ".join(sorted(config.model.keys()))
        raise UserError(
            f"config.{field}: {config.model_name} has no such setting; its settings: {settings}"
        )
    close = difflib.get_close_matches(field, paths, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown config field {field!r}.{hint}")


def field_type(config: ml_collections.ConfigDict, field: str) -> tuple[type, bool]:
    """(type, whether None is allowed) of a leaf, from its default or typed placeholder."""
    parent, leaf = _parent(config, field)
    kind = parent.get_type(leaf)
    reference = parent._fields.get(leaf)  # typed placeholders are FieldReferences
    optional = isinstance(reference, ml_collections.FieldReference) or parent[leaf] is None
    return kind, optional


def parse_value(config: ml_collections.ConfigDict, field: str, text: str | None) -> Any:
    """`text` converted to the type of `field` (None text: a bare boolean flag)."""
    kind, optional = field_type(config, field)
    name = kind.__name__
    if text is None:
        if kind is bool:
            return True
        raise UserError(f"--config.{field} needs a value ({name}), e.g. --config.{field}=...")
    if text.strip().lower() in _NONE and kind is not str or (text == "None" and kind is str):
        if optional:
            return None
        raise UserError(f"config.{field} cannot be None: give a {name}")
    parent, leaf = _parent(config, field)
    default = parent[leaf]
    if not default and field in TUPLE_ITEM_TYPES:
        default = (TUPLE_ITEM_TYPES[field](),)  # an item of the right type, for its type
    try:
        return _convert(text, kind, default=default)
    except (ValueError, SyntaxError, TypeError) as e:
        detail = f" ({e})" if str(e) else ""
        raise UserError(f"config.{field}={text!r} is not a valid {name}{detail}") from None


def _convert(text: str, kind: type, default: Any) -> Any:
    value = text.strip()
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError("use true or false")
    if kind is int:
        number = float(value.replace("_", ""))
        if not number.is_integer():
            raise ValueError("not a whole number")
        return int(number)
    if kind is float:
        return float(value.replace("_", ""))
    if kind is str:
        return text
    if kind in (tuple, list):
        return _convert_sequence(value, default)
    if kind is type(None):
        raise ValueError("the field has no type (its default is None and is not a placeholder)")
    raise ValueError(f"fields of type {kind.__name__} cannot be set from the command line")


def _convert_sequence(value: str, default: Any) -> tuple:
    if value.startswith(("(", "[")):
        parsed = ast.literal_eval(value)
        items = parsed if isinstance(parsed, tuple | list) else (parsed,)
    else:
        items = [v.strip() for v in value.split(",") if v.strip()]
    template = next(iter(default), None) if default else None
    if template is not None and not isinstance(template, tuple | list):
        items = [_convert(str(v), type(template), None) for v in items]
    return tuple(items)


def set_field(config: ml_collections.ConfigDict, field: str, text: str | None) -> None:
    """Parses `text` with the type of `field` and stores it."""
    value = parse_value(config, field, text)
    parent, leaf = _parent(config, field)
    parent[leaf] = value
