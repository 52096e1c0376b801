"""runnerd: a per-host daemon that runs local LLM engines."""

__version__ = "0.1.0"
