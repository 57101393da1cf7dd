"""User-facing errors: anything a user can fix (a config value, a file, a missing stage).

The CLI prints these as one line (``error: <message>``) and exits with status 2; anything else
is a bug and keeps its traceback. :func:`one_line` is the one way to quote a library's
exception inside such a message.
"""


class SpecialistsError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(SpecialistsError):
    """An unknown key, a wrong type or an impossible value in the configuration."""


class ModelError(SpecialistsError):
    """A model that cannot be built, or does not fit the data's inputs: names the model and the
    cause (a factory that raises, a module that does not import, a first layer of another size)."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s message on one line (its lines joined), at most ``limit`` characters; the
    exception's type name when it has no message."""
    text = " ".join(s.strip() for s in str(exc).splitlines() if s.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
