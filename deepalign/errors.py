"""The errors a run reports as its own (a clear message naming the key or file, exit code 2)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""
