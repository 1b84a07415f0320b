"""batchrun: offline batch inference planned around shared prefixes."""
__version__ = "0.1.0"
