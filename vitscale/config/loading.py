"""Loading an experiment: YAML (``configs/``) plus ``key.sub=value`` overrides, type-checked against
the schema, then the checks that need only the config (``validation.py``); and writing a config
back as YAML that loads to an equal one."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vitscale.config.shipped import shipped
from vitscale.config.schema import Config, ConfigError, all_keys, dataclass_type, hints
from vitscale.config.validation import check_config
from vitscale.files import write_text_atomic

def find_config(name: str | Path) -> Path:
    """An experiment YAML: a path, or the name of a shipped config (``vit_tiny`` or
    ``vit_tiny.yaml``, from ``configs/``)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for folder in shipped("configs"):
            for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
                if candidate.is_file():
                    return candidate
    names = sorted({p.stem for folder in shipped("configs") if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ConfigError(f"config file '{name}' does not exist; pass a YAML file or the name of a shipped config "
                      f"({', '.join(names) or 'none found'})")


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not near:  # match on the last component too: "lr" -> "train.lr"
        leaf = key.split(".")[-1]
        near = [k for k in all_keys() if k.split(".")[-1] == leaf][:1]
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] + (" or null" if type(None) in options else ""))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number, not a boolean")
    if isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r} must be of type {hint.__name__}, got {type(value).__name__}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Write a nested dict of values into the dataclass ``obj``, checking keys and types."""
    cls = type(obj)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of its keys "
                          f"({', '.join(names)}), got {values!r}")
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key)
        sub = dataclass_type(cls, name)
        if sub is not None:
            _merge(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _check_type(key, value, hints(cls)[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    value = _read_yaml(raw, f"override '{text}'") if raw.strip() else None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load an experiment from YAML, apply ``key=value`` overrides, check it.

    The checks here need only the config (keys, types, ranges, combinations of keys,
    files that must exist). What also needs the model and the data (a registered model
    name, heads that split over ``parallel.tensor``, shards that hold ``data.num_classes``
    classes) is checked by ``vitscale.experiment.load_experiment``, which every start runs;
    what needs the world size by ``validate_layout``.

    Args:
        path: a YAML file or the name of a shipped config (``find_config``), or None for
            the built-in defaults.
        overrides: strings such as ``"train.steps=100"``, applied in order.

    Returns:
        The checked Config.
    """
    cfg = Config()
    if path is not None:
        path = find_config(path)
        with open(path) as f:
            values = _read_yaml(f.read(), str(path))
        _merge(cfg, values or {})
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
    check_config(cfg)
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML (YAML 1.1) reads "1e-3" as a string; this loader reads it as the float users mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


# YAML 1.1 reads 2:4 as the base-60 integer 124; here it is an n:m sparsity pattern (model.sparsity.pattern),
# so digits:digits stay a string (YAML 1.2 has no base-60 numbers either). Own lists: SafeLoader's stay as they are.
_NM = re.compile(r"^\d+:\d+$")
for _first in "0123456789":
    _Loader.yaml_implicit_resolvers[_first] = [("tag:yaml.org,2002:str", _NM),
                                               *_Loader.yaml_implicit_resolvers.get(_first, [])]


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML text that ``load_config`` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, dump_config(cfg))


