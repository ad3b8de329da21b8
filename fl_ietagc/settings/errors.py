"""The one error class of a bad input: raised before any work starts, its message one line naming the key (or file)
and what is allowed."""


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""
