"""The configuration's error: ConfigError, raised for a value that cannot be accepted."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot be accepted; the message names key and source."""
