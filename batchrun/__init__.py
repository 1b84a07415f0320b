"""batchrun: offline batch inference planned around shared prefixes.

    import batchrun
    batchrun.run("jobs/example.toml")                       # -> batchrun.Summary
    batchrun.generate(df, max_tokens=64)                    # -> polars.DataFrame
    batchrun.embed(df)                                      # -> df + an embedding column

Importing batchrun is cheap: the API (batchrun.api) loads on first use, vLLM only when a job
starts its engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

_API = ("run", "generate", "embed", "build_config", "Summary")
_ERRORS = ("BatchrunError", "UsageError", "JobInterrupted")
__all__ = ["__version__", *_API, *_ERRORS, "JobConfig"]

if TYPE_CHECKING:
    from .api import Summary, build_config, embed, generate, run  # noqa: F401
    from .config import JobConfig  # noqa: F401
    from .errors import BatchrunError, JobInterrupted, UsageError  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    if name == "JobConfig":
        from .config import JobConfig

        return JobConfig
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
