"""Job files: what they hold, how flags override them, and the messages when they are wrong."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import pytest

from batchrun.api import build_config
from batchrun.config import ColumnMap, JobConfig, parse_size
from batchrun.errors import ConfigError
from batchrun.io.storage import Location
from batchrun.job_file import (
    _field_kinds,
    load_job_file,
    option_keys,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_example_job_file_resolves_paths_against_its_folder(tmp_path):
    cfg = load_job_file(REPO / "jobs" / "example.toml")
    assert cfg.input.local_path == REPO / "examples" / "prompts.jsonl"
    assert cfg.output.local_path == REPO / "out" / "example.parquet"
    assert cfg.columns.passthrough == ("topic",)
    assert cfg.engine.kv_cache_memory is None  # sized from the job when it runs
    sized = tmp_path / "sized.toml"
    sized.write_text('input = "in.jsonl"\noutput = "out.parquet"\n[engine]\n'
                     'kv_cache_memory = "512MiB"\n')
    assert load_job_file(sized).engine.kv_cache_memory == 512 << 20


def test_flags_override_the_file():
    cfg = load_job_file(REPO / "jobs" / "example.toml")
    cfg = with_overrides(cfg, **{"sampling.max_tokens": 7, "engine.attention": "default",
                                 "model": None})
    assert cfg.sampling.max_tokens == 7 and cfg.engine.attention == "default"
    assert cfg.model == "default"  # None means: flag not given


@pytest.mark.parametrize("text,size", [("256MiB", 256 << 20), ("1GiB", 1 << 30),
                                       ("1.5GB", 1_500_000_000), ("4096", 4096)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("body,message", [
    ('output = "o.parquet"', "no `input"),
    ('input = "i"\noutput = "o"\ncolour = 1', "unknown key"),
    ('input = "i"\noutput = "o"\n[sampling]\ntemperature = -1', "temperature"),
    ('input = "i"\noutput = "o"\n[columns]\nprompt = "x"\nmessages = "x"', "same input column"),
    ('input = "i"\noutput = "o"\n[engine]\nkv_cache_memory = "lots"', "256MiB"),
    ("input = ", "not valid TOML"),
    # Values of the wrong type are named, with the type the key takes.
    ('input = "i"\noutput = "o"\n[sampling]\nmax_tokens = "ten"', "`max_tokens` must be int"),
    ('input = "i"\noutput = "o"\nsampling = 3', "must be a table"),
    ('input = 3\noutput = "o"', "`input` must be Path"),
    ('input = "i"\noutput = "o"\n[engine]\nenforce_eager = 1', "`enforce_eager` must be bool"),
    ('input = "i"\noutput = "o"\n[sampling]\nmax_tokens = true', "`max_tokens` must be int"),
    ('input = "i"\noutput = "o"\n[engine]\nkind = "simulated"', "engine.kind must be one of"),
])
def test_mistakes_in_job_files_say_how_to_fix_them(tmp_path, body, message):
    path = tmp_path / "job.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_job_file(path)


def test_flags_and_options_are_read_and_checked_like_job_file_keys():
    cfg = load_job_file(REPO / "jobs" / "example.toml")
    cfg = with_overrides(cfg, **{"engine.kv_cache_memory": "512MiB", "sampling.stop": "\n",
                                 "engine.memory_budget": "1GiB", "columns.passthrough": ["a"]})
    assert cfg.engine.kv_cache_memory == 512 << 20 and cfg.engine.memory_budget == 1 << 30
    assert cfg.sampling.stop == ("\n",) and cfg.columns.passthrough == ("a",)
    assert load_job_file(REPO / "jobs" / "example.toml").engine.memory_budget == 4 << 30
    with pytest.raises(ConfigError, match="`max_tokens` must be int, not 'ten'"):
        with_overrides(cfg, **{"sampling.max_tokens": "ten"})
    with pytest.raises(ConfigError, match="`stop` must be a list of strings"):
        with_overrides(cfg, **{"sampling.stop": [1]})
    with pytest.raises(ConfigError, match="unknown option 'engine.colour'"):
        with_overrides(cfg, **{"engine.colour": 1})


# A value for every option, each unlike its default and valid for its field.
OPTION_VALUES: dict[str, object] = {
    **{f"{name}_column": f"my_{name}" for name in ColumnMap.__dataclass_fields__
       if name != "passthrough"},
    "passthrough": ("topic", "lang"),
    "max_tokens": 7, "temperature": 0.5, "top_p": 0.5, "seed": 11, "stop": ("END",),
    "json_schema": str(REPO / "jobs" / "schemas" / "ticket.json"), "choices": ("A", "B"),
    "regex": "[a-z]+", "logprobs": True, "top_logprobs": 3,
    "dtype": "bfloat16", "max_model_len": 1024, "block_size": 64, "kv_cache_memory": 1 << 28,
    "enforce_eager": True, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
    "max_num_seqs": 32, "attention": "prefix", "memory_budget": 1 << 30,
    "replicas": 3, "ray_address": "head:6379",
    "output": REPO / "out" / "other.parquet", "model": "/models/x", "input_format": "jsonl",
    "openai_output": REPO / "out" / "other.jsonl", "plan": False,
    "work_dir": REPO / "out" / "work",
    "replay_lengths": REPO / "out" / "earlier.parquet", "kind": "sim", "sim_device": "h100",
    "task": "embed", "normalize": False, "truncate": True,
    "max_loras": 2, "adapters": {"support": str(REPO / "adapters" / "support")},
    "report": False, "early_start": False,
}


def fields_of(cfg: JobConfig) -> dict[str, object]:
    """Every field of a config by its key ('output', 'sampling.max_tokens', ...); a location
    as the path or URI it holds."""
    def plain(value: object) -> object:
        return value.where if isinstance(value, Location) else value

    flat = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value) and not isinstance(value, Location):
            flat.update({f"{f.name}.{g.name}": plain(getattr(value, g.name))
                         for g in fields(value)})
        else:
            flat[f.name] = plain(value)
    return flat


def test_every_option_name_sets_the_field_of_that_name():
    keys = option_keys()
    assert set(keys) == set(OPTION_VALUES), "give every option a value in OPTION_VALUES"
    base = load_job_file(REPO / "jobs" / "example.toml")
    before = fields_of(base)
    for name, key in keys.items():
        # The field of that name: `<name>_column` for a column's, `passthrough` for the
        # columns passed through, else the field's own name.
        section, _, field_name = key.rpartition(".")
        named = f"{field_name}_column" if section == "columns" else field_name
        assert name == ("passthrough" if key == "columns.passthrough" else named), key
        # run()'s keyword argument sets that field, to that value, and no other field.
        cfg = build_config(base, **{name: OPTION_VALUES[name]})
        after = fields_of(cfg)
        assert after[key] == OPTION_VALUES[name] != before[key], name
        assert {k for k in after if after[k] != before[k]} == {key}, name
    # Every field has an option, but the input (the first argument) and the engine's seed
    # (`seed` is the sampling seed's); that one is set by its key.
    assert set(before) - set(keys.values()) == {"input", "engine.seed"}
    assert build_config(base, **{"engine.seed": 5}).engine.seed == 5


def test_a_config_field_of_a_type_no_check_knows_fails_at_once():
    @dataclass(frozen=True)
    class NewSection:
        ratio: complex = 1j

    with pytest.raises(TypeError, match=r"NewSection.ratio has type .*add it to config._KINDS"):
        _field_kinds(NewSection)


def test_the_cluster_section_and_its_flags(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out.parquet"\n[cluster]\nreplicas = 8\n'
                   'ray_address = "auto"\n')
    cfg = load_job_file(job)
    assert (cfg.cluster.replicas, cfg.cluster.ray_address, cfg.cluster.on_ray) == (8, "auto", True)
    cfg = with_overrides(cfg, **{option_keys()["replicas"]: 2,
                                 option_keys()["ray_address"]: "ray://head:10001"})
    assert (cfg.cluster.replicas, cfg.cluster.ray_address) == (2, "ray://head:10001")
    for wrong, message in (({"cluster.replicas": 0}, "cluster.replicas must be >= 1"),
                           ({"cluster.ray_address": "head"}, "is not a Ray address")):
        with pytest.raises(ConfigError, match=message):
            with_overrides(cfg, **wrong)
