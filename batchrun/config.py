"""Job configuration: what a `jobs/*.toml` file holds, merged with CLI flags.

A job file is TOML. Relative paths in it resolve against the job file's own folder, so a cron
line or an Airflow task can run it from any working directory::

    input = "../examples/prompts.jsonl"
    output = "../out/example.parquet"
    model = "default"            # or a local Hugging Face model folder

    [columns]                    # where to find things in the input rows
    prompt = "question"
    passthrough = ["category"]   # input columns copied to the output

    [sampling]                   # defaults; a row's own max_tokens / temperature / ... win
    max_tokens = 64
    temperature = 0.0
    choices = ["POSITIVE", "NEGATIVE"]   # or json_schema = "schemas/x.json", or regex = "..."
    top_logprobs = 3             # log-probabilities of each token and its 3 likeliest rivals

    [engine]
    kv_cache_memory = "256MiB"

    [cluster]                    # engine replicas as Ray actors (pip install 'batchrun[ray]')
    replicas = 4                 # on this machine: one GPU each (on CPU: side by side)
    ray_address = "auto"         # or "ray://head:10001": join a running Ray cluster
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io.storage import Location
from .structured import MAX_TOP_LOGPROBS, Constraint, job_constraint

DEFAULT_MODEL = "default"
SECTIONS = ("columns", "sampling", "engine", "cluster")  # a job file's [tables]


class _Choice(StrEnum):
    """A setting's choices, each a str: the CLI offers them, config checks them."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(choice.value for choice in cls)


class EngineKind(_Choice):
    """What runs a job: vLLM, or a deterministic stand-in with no model (pipeline tests)."""

    VLLM = "vllm"
    FAKE = "fake"


class InputFormat(_Choice):
    """How an input is read; AUTO detects Parquet, JSONL and OpenAI batch, file by file."""

    AUTO = "auto"
    JSONL = "jsonl"
    PARQUET = "parquet"
    OPENAI = "openai"


class AttentionMode(_Choice):
    """Whose attention a job runs (engine/attention/): batchrun's shared-prefix attention
    where it pays (AUTO), always (PREFIX), or vLLM's own (DEFAULT)."""

    AUTO = "auto"
    PREFIX = "prefix"
    DEFAULT = "default"


# How a value given as text is read, for the fields that say so in their metadata: a size
# ("256MiB", or a number of bytes), or one string for a list of one.
_SIZE = {"read": "size"}
_ONE_OR_MANY = {"read": "one_or_many"}


@dataclass(frozen=True)
class ColumnMap:
    """Names of the input columns batchrun reads (JSONL keys or Parquet columns)."""

    id: str = "id"
    prompt: str = "prompt"
    messages: str = "messages"
    prompt_token_ids: str = "prompt_token_ids"
    max_tokens: str = "max_tokens"
    temperature: str = "temperature"
    top_p: str = "top_p"
    seed: str = "seed"
    stop: str = "stop"
    logprobs: str = "logprobs"
    top_logprobs: str = "top_logprobs"
    response_format: str = "response_format"
    choices: str = "choices"
    regex: str = "regex"
    json_schema: str = "json_schema"
    passthrough: tuple[str, ...] = field(default=(), metadata=_ONE_OR_MANY)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling for rows that do not set their own. temperature 0 is greedy.

    At most one of json_schema (a JSON Schema file; relative paths resolve against the job
    file), choices and regex: the constraint of every row that does not give its own.
    top_logprobs (0-20) turns logprobs on."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=(), metadata=_ONE_OR_MANY)
    json_schema: str | None = None
    choices: tuple[str, ...] = ()
    regex: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclass(frozen=True)
class EngineOptions:
    """vLLM engine settings. None means: batchrun picks a measured default for the platform."""

    dtype: str | None = None
    max_model_len: int | None = None
    block_size: int | None = None
    # Bytes; vLLM's kv_cache_memory_bytes.
    kv_cache_memory: int | None = field(default=None, metadata=_SIZE)
    enforce_eager: bool | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    attention: str = AttentionMode.AUTO.value  # an AttentionMode
    seed: int = 0
    # Bytes batchrun itself may hold for a job's rows, tokens and plans (not the engine's).
    memory_budget: int = field(default=4 << 30, metadata=_SIZE)


@dataclass(frozen=True)
class ClusterOptions:
    """Where the engines run: one in this process (the default), or `replicas` Ray actors on
    this machine or on the Ray cluster at `ray_address` ("auto": the one this machine is part
    of; "ray://host:port": a remote one through Ray Client)."""

    replicas: int = 1
    ray_address: str | None = None

    @property
    def on_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None


@dataclass(frozen=True)
class JobConfig:
    """A job. input/output/openai_output are Locations: local paths or URIs (s3://, gs://,
    ...), given from Python as a Location, a Path or a string; the input may be a folder or a
    glob (a dataset). work_dir is a local folder: a Path (given as a string, a Path or a local
    Location); a remote one is a ConfigError."""

    input: Location
    output: Location
    model: str = DEFAULT_MODEL
    input_format: str = InputFormat.AUTO.value
    columns: ColumnMap = field(default_factory=ColumnMap)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    engine: EngineOptions = field(default_factory=EngineOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    openai_output: Location | None = None  # also write OpenAI-batch-style JSONL here
    plan: bool = True  # False: run in file order (what plain vLLM would do)
    # Where the checkpoint (and, for a remote output, the staged file) lives; None: next to
    # a local output, or a cache folder for a remote one (batchrun.job.paths.output_paths).
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        # Values given from Python are kept as given (nothing resolved): only their types change.
        for name in ("input", "output", "openai_output"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, Location.coerce(value))
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir",
                               Location.coerce(self.work_dir).require_local("work_dir"))

    def fingerprint_settings(self) -> dict[str, Any]:
        """Settings that change results: a resumed job must match them."""
        default = default_constraint(self.sampling)
        return {
            "model": self.model,
            "input_format": self.input_format,
            "columns": asdict(self.columns),
            "sampling": asdict(self.sampling),
            # the schema file's content, not only its path
            "constraint": None if default is None else [default.kind, default.spec],
            "max_model_len": self.engine.max_model_len,
            "dtype": self.engine.dtype,
        }


_RAY_ADDRESS_RE = re.compile(r"^(ray://)?[A-Za-z0-9_.\-]+:[0-9]+$")
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'256MiB' -> 268435456. Plain numbers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read size {text!r}: write it like 256MiB, 2GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


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
    cluster = dict(raw.pop("cluster", {}))
    raw["input"] = resolve(raw["input"])
    raw["output"] = resolve(raw["output"])
    if "openai_output" in raw:
        raw["openai_output"] = resolve(raw["openai_output"])
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


def validate_config(cfg: JobConfig) -> None:
    if cfg.input_format not in InputFormat.values():
        raise ConfigError(f"input_format must be one of {InputFormat.values()}, not "
                          f"{cfg.input_format!r}")
    if cfg.engine.attention not in AttentionMode.values():
        raise ConfigError(f"attention must be one of {AttentionMode.values()}, not "
                          f"{cfg.engine.attention!r}")
    c = cfg.columns
    named = [c.id, c.prompt, c.messages, c.prompt_token_ids, c.max_tokens, c.temperature,
             c.top_p, c.seed, c.stop, c.logprobs, c.top_logprobs, c.response_format, c.choices,
             c.regex, c.json_schema]
    if len(set(named)) != len(named):
        twice = sorted({n for n in named if named.count(n) > 1})
        raise ConfigError(f"[columns] maps two fields to the same input column {twice}; "
                          "give each field its own column")
    s = cfg.sampling
    if s.top_logprobs is not None and not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"sampling.top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, "
                          f"not {s.top_logprobs}")
    default_constraint(s)  # raises ConfigError for a bad schema, regex or choice list
    if s.max_tokens < 1:
        raise ConfigError(f"sampling.max_tokens must be >= 1, not {s.max_tokens}")
    if s.temperature < 0:
        raise ConfigError(f"sampling.temperature must be >= 0, not {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"sampling.top_p must be in (0, 1], not {s.top_p}")
    validate_cluster(cfg.cluster)


def validate_cluster(cluster: ClusterOptions) -> None:
    if cluster.replicas < 1:
        raise ConfigError(f"cluster.replicas must be >= 1, not {cluster.replicas}")
    address = cluster.ray_address
    if address is not None and address != "auto" and not _RAY_ADDRESS_RE.match(address):
        raise ConfigError(f"cluster.ray_address {address!r} is not a Ray address: write "
                          "\"auto\" (the cluster this machine is part of), "
                          "\"ray://HEAD:10001\" (Ray Client) or \"HEAD:6379\"")


def default_constraint(sampling: SamplingDefaults) -> Constraint | None:
    """The job's default constraint (json_schema, choices or regex), checked and read; None
    when it has none. Raises ConfigError: a bad default is the whole job's problem."""
    given = [name for name in ("json_schema", "choices", "regex") if getattr(sampling, name)]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"[sampling] sets {' and '.join(given)}; give only one default "
                          "constraint (rows can still set their own)")
    return job_constraint(sampling.json_schema, sampling.choices, sampling.regex)


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
