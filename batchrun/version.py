"""The one place batchrun's version is set."""

__version__ = "0.1.0"
