"""Structured outputs: what a row may constrain its completion to, and whether it did.

A constraint is one of
    json_schema  the completion is JSON valid against a JSON Schema (spec: the schema as JSON text)
    json_object  the completion is a JSON object (spec: None)
    choice       the completion is exactly one of a list of strings (spec: the list as JSON text)
    regex        the completion fully matches a regular expression (spec: the pattern)
    text         free text, said explicitly (OpenAI's {"type": "text"}): the job's default
                 constraint does not apply to the row
vLLM enforces them while decoding (xgrammar, or guidance where xgrammar cannot: vLLM's "auto"
backend), and compiles each distinct grammar once: xgrammar caches compiled grammars by their
text, which is why a spec is stored as one canonical string.

Specs are checked when the input is read, without the model: a schema that is not JSON, not a
valid JSON Schema (by its meta-schema), or that neither grammar backend can enforce, and a
regex that neither backend can compile, are the row's error (or, as the job's default, a
ConfigError). Each distinct spec is checked once.

The checks use jsonschema and llguidance (xgrammar when llguidance refuses: vLLM tries xgrammar
first), which come with vLLM; without them only what Python's json and re can tell is checked,
and the engine rejects the rest row by row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, one_line, show

TEXT, JSON_OBJECT, JSON_SCHEMA, CHOICE, REGEX = "text", "json_object", "json_schema", "choice", \
    "regex"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs
# OpenAI (and vLLM's server) write a log-probability of -inf as this: JSON has no infinity.
LOGPROB_FLOOR = -9999.0


class ConstraintError(ValueError):
    """Why a spec cannot be used: one line, without naming the field (the caller does)."""


@dataclass(frozen=True)
class Constraint:
    kind: str
    spec: str | None = None

    def choices(self) -> list[str]:
        return json.loads(self.spec) if self.kind == CHOICE else []


# A backend's message in a row's error: one line of at most this many characters.
_CHARS = 160


# --- Reading a row's values ----------------------------------------------------------------

def schema_text(value: Any) -> str:
    """A JSON Schema given as an object or as JSON text -> its canonical text, checked.
    Key order is kept: it is the order in which the model writes the properties."""
    if type(value) is str:
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConstraintError(f"is not valid JSON ({one_line(e, _CHARS)}); give a JSON Schema "
                                  "object or its JSON text") from None
        except RecursionError:
            raise ConstraintError("is nested too deeply") from None
    if type(value) is not dict:
        raise ConstraintError(f"must be a JSON Schema object (or its JSON text), got "
                              f"{show(value)}")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        text.encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        raise ConstraintError("must be plain JSON (no NaN, no unpaired surrogates, not nested "
                              "too deeply)") from None
    check_schema(text)
    return text


def choices_text(value: Any) -> str:
    if (type(value) is not list or not value
            or any(type(c) is not str or not c for c in value)):
        raise ConstraintError(f"must be a non-empty list of non-empty strings, got "
                              f"{show(value)}")
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:
        raise ConstraintError("holds an unpaired UTF-16 surrogate; write valid text") from None


def regex_text(value: Any) -> str:
    if type(value) is not str or not value:
        raise ConstraintError(f"must be a non-empty string, got {show(value)}")
    check_regex(value)
    return value


def response_format(value: Any, label: str) -> Constraint:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", ...}.
    `label` is the field's name as the user wrote it, for messages about its parts."""
    if type(value) is str:  # as a Parquet string column holds it
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ConstraintError("is not valid JSON; give an object like "
                                  '{"type": "json_object"}') from None
    kind = value.get("type") if type(value) is dict else None
    if kind == TEXT:
        return Constraint(TEXT)
    if kind == JSON_OBJECT:
        return Constraint(JSON_OBJECT)
    if kind == JSON_SCHEMA:
        inner = value.get("json_schema")
        if type(inner) is not dict or "schema" not in inner:
            raise ConstraintError(
                f'"{label}.json_schema" must be an object with a "schema" key (and optional '
                f'"name", "strict"), got {show(inner)}')
        try:
            return Constraint(JSON_SCHEMA, schema_text(inner["schema"]))
        except ConstraintError as e:
            raise ConstraintError(f'"{label}.json_schema.schema" {e}') from None
    raise ConstraintError(f'must be {{"type": "text" | "json_object" | "json_schema", ...}}, '
                          f"got {show(value)}")


@lru_cache(maxsize=8)
def job_constraint(json_schema: str | None, choices: tuple[str, ...],
                   regex: str | None) -> Constraint:
    """A job's default constraint, the one of json_schema (a file), choices and regex it
    gives, read and checked. Raises ConfigError: a bad default is the whole job's problem."""
    try:
        if json_schema:
            try:
                text = Path(json_schema).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                reason = getattr(e, "strerror", None) or e
                raise ConfigError(f"sampling.json_schema: cannot read {json_schema} "
                                  f"({reason}); check the path (relative paths resolve "
                                  "against the job file)") from None
            try:
                return Constraint(JSON_SCHEMA, schema_text(text))
            except ConstraintError as e:
                raise ConfigError(f"sampling.json_schema: {json_schema} {e}") from None
        if choices:
            return Constraint(CHOICE, choices_text(list(choices)))
        return Constraint(REGEX, regex_text(regex))
    except ConstraintError as e:
        name = "choices" if choices else "regex"
        raise ConfigError(f"sampling.{name} {e}") from None


# --- Is the spec usable? (each distinct spec once) ----------------------------------------

@lru_cache(maxsize=1024)
def check_schema(text: str) -> None:
    """Raise ConstraintError if the schema (canonical text) is invalid or cannot be enforced."""
    schema = json.loads(text)
    try:
        from jsonschema import exceptions, validators
    except ImportError:  # pragma: no cover - jsonschema comes with vLLM
        pass
    else:
        try:
            validators.validator_for(schema).check_schema(schema)
        except exceptions.SchemaError as e:
            where = ".".join(map(str, e.path)) or "the top level"
            raise ConstraintError(f"is not a valid JSON Schema: {one_line(e.message, _CHARS)} "
                                  f"(at {where})") from None
        except Exception as e:  # noqa: BLE001 - whatever else the meta-schema check meets
            raise ConstraintError(f"is not a valid JSON Schema: {one_line(e, _CHARS)}") from None
    problem = _grammar_problem("json", text)
    if problem:
        raise ConstraintError(f"cannot be enforced while decoding: {problem}; "
                              "simplify the schema")


@lru_cache(maxsize=1024)
def check_regex(pattern: str) -> None:
    problem = _grammar_problem("regex", pattern)
    if problem:
        raise ConstraintError(f"is not a regular expression the decoder can enforce "
                              f"({problem}); fix the pattern")


def _grammar_problem(kind: str, spec: str) -> str | None:
    """What vLLM's "auto" structured-output backend would say about the spec: None when one
    of its backends (xgrammar, then guidance) takes it. llguidance is asked first because it
    imports in a tenth of a second (xgrammar takes seconds), and it takes nearly everything."""
    try:
        from llguidance import LLMatcher
    except ImportError:  # pragma: no cover - llguidance comes with vLLM
        LLMatcher = None  # noqa: N806
    problem = None
    if LLMatcher is not None:
        try:
            grammar = (LLMatcher.grammar_from_json_schema(spec, defaults={
                "whitespace_flexible": True}) if kind == "json"
                else LLMatcher.grammar_from_regex(spec))
            problem = LLMatcher.validate_grammar(grammar, None) or None
        except Exception as e:  # llguidance raises ValueError/TypeError/RuntimeError
            problem = str(e) or type(e).__name__
        if problem is None:
            return None
    try:
        import xgrammar as xgr
    except ImportError:
        xgr = None
    if xgr is not None:
        try:
            if kind == "json":
                xgr.Grammar.from_json_schema(spec)
            else:
                xgr.Grammar.from_regex(spec)
            return None
        except Exception as e:
            problem = problem or str(e)
    if problem is None and kind == "regex":  # no backend here: Python's own parser
        try:
            re.compile(spec)
        except (re.error, RecursionError, OverflowError) as e:
            problem = str(e)
    return _backend_problem(problem) if problem else None


def _backend_problem(message: str) -> str:
    """A grammar backend's (often multi-line, caret-pointing) message as one short line: its
    "error:" line where it has one (regex-syntax's "error: unclosed group" says the most)."""
    for line in message.splitlines():
        if line.strip().startswith("error:"):
            return one_line(line.strip()[len("error:"):], _CHARS)
    return one_line(message, _CHARS)


# --- Did the completion keep to it? --------------------------------------------------------

@lru_cache(maxsize=256)
def _validator(schema_spec: str) -> Any:
    try:
        from jsonschema import validators
    except ImportError:  # pragma: no cover
        return None
    schema = json.loads(schema_spec)
    return validators.validator_for(schema)(schema)


@lru_cache(maxsize=256)
def _python_regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return None  # a dialect feature Python lacks (\p{L}): the decoder's word stands


def output_problem(constraint: Constraint, text: str) -> str | None:
    """None if `text` keeps to the constraint, else what is wrong with it (one line). The
    decoder enforces the constraint, so this only fails when decoding stopped early: at
    max_tokens, or at a stop string."""
    kind = constraint.kind
    if kind == CHOICE:
        if text in constraint.choices():
            return None
        return f"the output {show(text, 40)} is not one of the choices"
    if kind == REGEX:
        pattern = _python_regex(constraint.spec)
        if pattern is None or pattern.fullmatch(text):
            return None
        return f"the output {show(text, 40)} does not fully match the regex"
    if kind in (JSON_OBJECT, JSON_SCHEMA):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return "the output is not complete JSON"
        if kind == JSON_OBJECT:
            return None if type(value) is dict else "the output is not a JSON object"
        validator = _validator(constraint.spec)
        if validator is None:
            return None
        error = next(iter(validator.iter_errors(value)), None)
        if error is None:
            return None
        where = ".".join(map(str, error.absolute_path)) or "the top level"
        return f"the output does not match the JSON schema: {one_line(error.message, _CHARS)} " \
               f"(at {where})"
    return None


def max_choice_tokens(constraint: Constraint) -> int | None:
    """An upper bound on the tokens a choice takes, end-of-sequence included: every token
    adds at least one byte of text. None for other kinds (no bound)."""
    if constraint.kind != CHOICE:
        return None
    return max(len(c.encode()) for c in constraint.choices()) + 1


def vllm_structured_outputs(constraint: Constraint) -> dict[str, Any] | None:
    """Keyword arguments of vLLM's StructuredOutputsParams; None for free text."""
    kind = constraint.kind
    if kind == JSON_SCHEMA:
        return {"json": constraint.spec}
    if kind == JSON_OBJECT:
        return {"json_object": True}
    if kind == CHOICE:
        return {"choice": constraint.choices()}
    if kind == REGEX:
        return {"regex": constraint.spec}
    return None


def clamp_logprob(value: float) -> float:
    """-inf (a token the constraint forbade) and NaN become LOGPROB_FLOOR."""
    return float(value) if value >= LOGPROB_FLOOR else LOGPROB_FLOOR
