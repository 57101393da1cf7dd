"""Constraints declared beside the config's fields, and the one checker that walks them.

In the spirit of scikit-learn's ``_parameter_constraints``: every config dataclass has a class
attribute ``_constraints = {field: [constraint, ...]}``. A value is valid when it satisfies ANY
constraint of its list; ``None`` in the list lets the value be null, a Python type (``bool``,
``str``) accepts any value of that type. A subclass inherits its parents' declarations (its own
override them, field by field). :func:`check_constraints` walks every section of a config and
stops at the first value that fits none with one :class:`ConfigError` line naming its key:
``config key 'generalist.lr': 0 is not in (0, 100]``.

Some constraints touch the machine (a file exists, a user's module imports, a timm name
resolves): their ``environment`` part runs only in ``check_constraints(cfg, environment=True)``,
which the process that starts the work calls once (:func:`specialists.rundir.config.check_environment`);
everywhere else (a Ray worker, another torchrun rank, reopening a run) only the pure part runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError


def _show(value) -> str:
    """A value as a message quotes it: text in quotes, numbers and lists as written."""
    return f"'{value}'" if isinstance(value, str) else str(value)


def _number(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


class Constraint:
    """One way a value may be valid. ``str(c)`` completes "VALUE is not ..." in the message."""

    environment = False  # whether :meth:`here` touches the disk or imports code
    note = ""  # said after the message, in parentheses: a unit, or why the bound

    def ok(self, value) -> bool:
        """The pure check: the value's type, range, spelling (no disk, no imports)."""
        raise NotImplementedError

    def here(self, value) -> Optional[str]:
        """The machine's check of a value :meth:`ok` accepted: None when it passes, else why
        not (``""``: the generic "VALUE is not ..." message)."""
        return None


class Interval(Constraint):
    """A number between ``lo`` and ``hi`` (None: unbounded on that side); ``closed`` says which
    bounds belong to it: both | left | right | neither. ``kind`` int takes whole numbers only,
    float takes any (never a bool). ``note``: said after the message (a unit, the bound's reason)."""

    def __init__(self, kind: type, lo=None, hi=None, closed: str = "both", note: str = ""):
        assert kind in (int, float) and closed in ("both", "left", "right", "neither"), (kind, closed)
        self.kind, self.lo, self.hi, self.closed, self.note = kind, lo, hi, closed, note

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if self.lo is not None and not (value >= self.lo if self.closed in ("both", "left") else value > self.lo):
            return False
        return self.hi is None or (value <= self.hi if self.closed in ("both", "right") else value < self.hi)

    def __str__(self) -> str:
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.hi is None:
            return f"{'>=' if left else '>'} {_number(self.lo)}"
        if self.lo is None:
            return f"{'<=' if right else '<'} {_number(self.hi)}"
        return f"in {'[' if left else '('}{_number(self.lo)}, {_number(self.hi)}{']' if right else ')'}"


class Options(Constraint):
    """One of ``choices``. A registry (a dict or set, to which plug-ins add) is read when checked,
    and listed sorted; a tuple is listed as written."""

    def __init__(self, choices: Iterable[str]):
        self.choices = choices

    def ok(self, value) -> bool:
        return isinstance(value, str) and value in self.choices

    def __str__(self) -> str:
        names = sorted(self.choices) if isinstance(self.choices, (Mapping, Set)) else self.choices
        return f"one of {', '.join(map(str, names))}"


class Prefix(Constraint):
    """Text starting with one of ``prefixes`` (``python:``), described as ``what``; ``resolve``
    (name -> why it names nothing, or None) is the machine's check: it may import the code."""

    def __init__(self, prefixes: tuple[str, ...], what: str, resolve: Optional[Callable[[str], Optional[str]]] = None):
        self.prefixes, self.what, self.resolve = prefixes, what, resolve
        self.environment = resolve is not None

    def ok(self, value) -> bool:
        return isinstance(value, str) and value.startswith(self.prefixes)

    def here(self, value) -> Optional[str]:
        return self.resolve(value) if self.resolve else None

    def __str__(self) -> str:
        return self.what


class File(Constraint):
    """The path of a file (of name ending ``suffix``, when given): any such text is well formed;
    that it is a file here is the machine's check (``expand``: ``~`` names the home folder, as
    the file's reader takes it)."""

    environment = True

    def __init__(self, what: str = "a file", suffix: Optional[str] = None, expand: bool = True, note: str = ""):
        self.what, self.suffix, self.expand, self.note = what, suffix, expand, note

    def ok(self, value) -> bool:
        return isinstance(value, str) and value != "" and (self.suffix is None or Path(value).suffix == self.suffix)

    def here(self, value) -> Optional[str]:
        path = Path(value).expanduser() if self.expand else Path(value)
        return None if path.is_file() else ""

    def __str__(self) -> str:
        return self.what


class Parsed(Constraint):
    """Text ``parse`` accepts (it raises ValueError on anything else), described as ``what``."""

    def __init__(self, parse: Callable, what: str):
        self.parse, self.what = parse, what

    def ok(self, value) -> bool:
        try:
            self.parse(value)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return self.what


class Each(Constraint):
    """A list whose every item satisfies ``item``."""

    def __init__(self, item: Constraint):
        self.item = item

    def ok(self, value) -> bool:
        return isinstance(value, list) and all(self.item.ok(v) for v in value)

    def __str__(self) -> str:
        return f"a list whose every item is {self.item}"


class NonEmpty(Constraint):
    """Text with at least one character, described as ``what``."""

    def __init__(self, what: str):
        self.what = what

    def ok(self, value) -> bool:
        return isinstance(value, str) and value != ""

    def __str__(self) -> str:
        return self.what


def _fits(rule, value) -> bool:
    if rule is None:
        return value is None
    if isinstance(rule, type):  # a plain type: bool is no int here, as in Interval
        return isinstance(value, rule) and not (rule is not bool and isinstance(value, bool))
    return rule.ok(value)


def message(value, rules: list) -> str:
    """"VALUE is not A nor B (NOTES)": the constraints a value fits none of, and their notes
    (null left unsaid: the schema's type already says a key may be null)."""
    said = [f"a {r.__name__}" if isinstance(r, type) else str(r) for r in rules if r is not None]
    notes = [r.note for r in rules if isinstance(r, Constraint) and r.note]
    return f"{_show(value)} is not {' nor '.join(said)}" + "".join(f" ({n})" for n in notes)


def declared(cls: type) -> dict[str, list]:
    """``{field: constraints}`` of a config dataclass: its own declarations over its parents'."""
    out: dict[str, list] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("_constraints", {}))
    return out


def sections(cls: type, prefix: str = "") -> Iterable[tuple[str, type]]:
    """``(dotted prefix, dataclass)`` of ``cls`` and every section below it, ``("", cls)`` first."""
    yield prefix, cls
    for f in dataclasses.fields(cls):
        sub = f.default_factory
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            yield from sections(sub, f"{prefix}{f.name}.")


def check_constraints(cfg: DictConfig, environment: bool = False) -> None:
    """Check every setting of ``cfg`` (a structured config) and of its sections against their
    declared constraints; the first that fits none is one ConfigError line naming its key.

    ``environment=False``: the pure checks (and every float finite: no setting means inf or
    nan). ``environment=True``: only the machine's checks, of a config that passed the pure ones.
    A field that declares no constraints is a programming error (every setting declares them,
    ``[bool]`` or ``[str]`` when any value of its type will do)."""
    # plain values, read once: much faster than omegaconf's typed access, setting by setting
    _check_section(OmegaConf.get_type(cfg), OmegaConf.to_container(cfg, resolve=True), environment, "")


def _check_section(cls: type, values: dict, environment: bool, prefix: str) -> None:
    rules = declared(cls)
    for f in dataclasses.fields(cls):
        key, value, sub = prefix + f.name, values[f.name], f.default_factory
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            _check_section(sub, value, environment, key + ".")
            continue
        if f.name not in rules:
            raise TypeError(f"config section {cls.__name__} declares no constraints for '{f.name}' (_constraints)")
        allowed = rules[f.name]
        if not environment:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{key}': must be a finite number, got {value}")
            if not any(_fits(r, value) for r in allowed):
                raise ConfigError(f"config key '{key}': {message(value, allowed)}")
            continue
        rule = next(r for r in allowed if _fits(r, value))  # the first it fits: what it was taken for
        why = rule.here(value) if isinstance(rule, Constraint) and rule.environment else None
        if why is not None:
            raise ConfigError(f"config key '{key}': {why or message(value, allowed)}")


__all__ = ["Constraint", "Each", "File", "Interval", "NonEmpty", "Options", "Parsed", "Prefix", "check_constraints",
           "declared", "message", "sections"]
