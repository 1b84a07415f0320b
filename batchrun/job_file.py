"""Reading a job file and applying overrides (CLI flags, the Python API's options): every
key checked against the config's dataclasses (config.py), every value against its field's
type, each mistake one message that names the key and the fix."""

from __future__ import annotations

import os
import tomllib
import types
import typing
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_MODEL,
    SECTIONS,
    ClusterOptions,
    ColumnMap,
    EngineOptions,
    JobConfig,
    SamplingDefaults,
    parse_size,
    validate_config,
)
from .errors import ConfigError
from .io.storage import Location

# The value types of the config's fields: what a job file or an override may give for each,
# and how a message names it. A field of any other type fails at import (_field_kinds), so a
# new type cannot go unchecked.
_KINDS: dict[frozenset[Any], tuple[tuple[type, ...], str]] = {
    frozenset({int}): ((int,), "int"),
    frozenset({float}): ((int, float), "float"),
    frozenset({str}): ((str,), "str"),
    frozenset({bool}): ((bool,), "bool"),
    frozenset({Path}): ((str, Path), "Path"),
    frozenset({Location}): ((str, Path, Location), "Path (a local path or a URI)"),
    frozenset({tuple[str, ...]}): ((list, tuple), "a list of strings"),
    frozenset({dict[str, str]}): ((dict,), "a table of names and folders"),
}


_LOCATIONS = (frozenset({Path}), frozenset({Location}))


def _kind_of(hint: Any) -> frozenset[Any]:
    """The types a field's type hint allows, None left out: {int} for `int | None`,
    {Location} for `Location | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return frozenset(a for a in typing.get_args(hint) if a is not type(None))
    return frozenset({hint})


def _field_kinds(cls: type) -> dict[str, frozenset[Any] | None]:
    """Field name -> _KINDS key for a config dataclass; sections (dataclasses) map to None."""
    kinds: dict[str, frozenset[Any] | None] = {}
    for name, hint in typing.get_type_hints(cls).items():
        kind = _kind_of(hint)
        if kind <= set(_SECTION_CLASSES):
            kinds[name] = None
        elif kind in _KINDS:
            kinds[name] = kind
        else:
            raise TypeError(f"{cls.__name__}.{name} has type {hint}, which job files and "
                            "flags cannot check: add it to config._KINDS")
    return kinds


_SECTION_CLASSES = (ColumnMap, SamplingDefaults, EngineOptions, ClusterOptions)


_SECTIONS: dict[str, type] = {"": JobConfig, "columns": ColumnMap, "sampling": SamplingDefaults,
                              "engine": EngineOptions, "cluster": ClusterOptions}


_FIELDS: dict[type, dict[str, Any]] = {cls: _field_kinds(cls) for cls in _SECTIONS.values()}


# The fields that may be None, by section: an override of '' clears those of type str.
_NULLABLE: dict[type, set[str]] = {
    cls: {name for name, hint in typing.get_type_hints(cls).items()
          if type(None) in typing.get_args(hint)} for cls in _SECTIONS.values()}


def _read(cls: type, name: str, value: Any) -> Any:
    """A value as the field takes it: a size read from text, one string made a list of one,
    a list made a tuple; other values as they are."""
    how = next(f.metadata.get("read") for f in fields(cls) if f.name == name)
    if how == "size" and isinstance(value, str):
        return parse_size(value)
    if how == "one_or_many" and isinstance(value, str):
        return (value,)
    if _FIELDS[cls][name] == {tuple[str, ...]} and isinstance(value, list):
        return tuple(value)
    return value


def _check_value(cls: type, name: str, value: Any, where: str) -> None:
    """A ConfigError naming the field and the type it takes, when `value` is not of it."""
    allowed, words = _KINDS[_FIELDS[cls][name]]
    # bool is an int in Python, but `max_tokens = true` is a mistake, not a 1.
    wrong_bool = isinstance(value, bool) and bool not in allowed
    items_ok = not isinstance(value, (list, tuple)) or all(isinstance(v, str) for v in value)
    if not isinstance(value, allowed) or wrong_bool or not items_ok:
        raise ConfigError(f"{where}`{name}` must be {words}, not {value!r}")


def _check(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The section's values read and checked: unknown keys and values of the wrong type,
    each with a message that names the fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table (a [section] of keys), not {data!r}")
    known = _FIELDS[cls]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    values = {}
    for key, value in data.items():
        values[key] = _read(cls, key, value)
        _check_value(cls, key, values[key], f"{where}: ")
    return values


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    return cls(**_check(cls, data, where))


def load_job_file(path: Location | str | os.PathLike[str]) -> JobConfig:
    """Read a job TOML file (a local path or a URI). Raises ConfigError with a message that
    names the fix."""
    path = Location.coerce(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"job file {path} is not valid TOML: {e}") from None
    base = path.parent

    def resolve(p: str | None) -> Location | None:
        return None if p is None else Location.of(p, base)

    for required in ("input", "output"):
        if required not in raw:
            raise ConfigError(f"job file {path} has no `{required} = \"...\"` line")
    for section in SECTIONS:
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"[{section}] in {path} must be a table of keys, not "
                              f"{raw[section]!r}")
    _check(JobConfig, {k: v for k, v in raw.items() if k not in SECTIONS}, f"job file {path}")
    columns = dict(raw.pop("columns", {}))
    sampling = dict(raw.pop("sampling", {}))
    if isinstance(sampling.get("json_schema"), str):
        sampling["json_schema"] = str(resolve(sampling["json_schema"]))
    engine = dict(raw.pop("engine", {}))
    if isinstance(engine.get("replay_lengths"), str):
        engine["replay_lengths"] = resolve(engine["replay_lengths"])
    cluster = dict(raw.pop("cluster", {}))
    raw["input"] = resolve(raw["input"])
    raw["output"] = resolve(raw["output"])
    if "openai_output" in raw:
        raw["openai_output"] = resolve(raw["openai_output"])
    if isinstance(raw.get("adapters"), dict):
        raw["adapters"] = {name: str(resolve(folder)) if isinstance(folder, str) else folder
                           for name, folder in raw["adapters"].items()}
    if "work_dir" in raw:  # relative to a local job file's folder, else to the working one
        work_dir = Location.of(raw["work_dir"], None if base.is_remote else base)
        raw["work_dir"] = work_dir.require_local(f"job file {path}: `work_dir`")
    if ("model" in raw and raw["model"] != DEFAULT_MODEL and not base.is_remote
            and (base.local_path / raw["model"]).exists()):
        raw["model"] = str((base.local_path / raw["model"]).resolve())
    cfg = _build(JobConfig, raw, f"job file {path}")
    cfg = replace(
        cfg,
        columns=_build(ColumnMap, columns, f"[columns] in {path}"),
        sampling=_build(SamplingDefaults, sampling, f"[sampling] in {path}"),
        engine=_build(EngineOptions, engine, f"[engine] in {path}"),
        cluster=_build(ClusterOptions, cluster, f"[cluster] in {path}"),
    )
    validate_config(cfg)
    return cfg


def with_overrides(cfg: JobConfig, **overrides: Any) -> JobConfig:
    """Flags and run()'s options on top of a job. Keys: a JobConfig field ('output') or
    'section.field' ('sampling.max_tokens', 'engine.kv_cache_memory', 'columns.prompt');
    None means not given, and so does an empty [columns] value. A value is read as the same
    key in a job file is (a size like '256MiB', one stop string or a list), and checked
    against the field's type. '' clears a `str | None` field: a constraint flag replaces the
    job file's default constraint, whichever kind that was."""
    changes: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for key, given in overrides.items():
        value = given.value if isinstance(given, Enum) else given
        section, _, name = key.rpartition(".")
        cls = _SECTIONS.get(section)
        if cls is None or _FIELDS[cls].get(name) is None or key == "input":
            raise ConfigError(f"unknown option {key!r}; known options are the keys of a job "
                              "file: 'output', 'model', ..., 'sampling.x', 'engine.x', "
                              "'columns.x', 'cluster.x'")
        if value is None or (section == "columns" and not value):
            continue
        kind = _FIELDS[cls][name]
        if value == "" and kind == {str} and name in _NULLABLE[cls]:
            value = None
        elif kind == {str} and isinstance(value, Path):
            value = str(value)  # a model folder, a schema file
        elif kind in _LOCATIONS and isinstance(value, (str, Path, Location)):
            value = Location.of(value)  # a Path field (work_dir): JobConfig requires it local
        elif kind == {dict[str, str]} and isinstance(value, dict):
            # Adapters given on top of a job file's add to them (a name given again wins).
            value = {**getattr(cfg, name), **{k: str(Location.of(v)) if isinstance(
                v, (str, Path, Location)) else v for k, v in value.items()}}
        else:
            value = _read(cls, name, value)
            _check_value(cls, name, value, "")
        changes[section][name] = value
    cfg = replace(cfg, **changes.pop(""))
    for section, values in changes.items():
        if values:
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    validate_config(cfg)
    return cfg


def option_keys() -> dict[str, str]:
    """run()'s keyword arguments -> the key of the field each sets (`with_overrides`): a
    top-level field by its name, a [sampling], [engine] or [cluster] key by its own name
    (`seed` is sampling's; the engine's is 'engine.seed'), a [columns] key as
    `<name>_column` and `passthrough`."""
    keys = {f"{name}_column": f"columns.{name}" for name in _FIELDS[ColumnMap]}
    keys["passthrough"] = "columns.passthrough"
    keys.update({name: f"engine.{name}" for name in _FIELDS[EngineOptions]})
    keys.update({name: f"sampling.{name}" for name in _FIELDS[SamplingDefaults]})
    keys.update({name: f"cluster.{name}" for name in _FIELDS[ClusterOptions]})
    keys.update({name: name for name, kind in _FIELDS[JobConfig].items()
                 if kind is not None and name != "input"})
    del keys["passthrough_column"]
    return keys
