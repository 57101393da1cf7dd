"""User-facing errors: anything a user can fix (a config value, a file, a missing stage).

The CLI prints these as one line (``error: <message>``) and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class SpecialistsError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(SpecialistsError):
    """An unknown key, a wrong type or an impossible value in the configuration."""
