"""Plug-in options: what a strategy or score reads from the plan besides where and how much, declared in the plug-in's
own file with its default and its check, so that the plan validates every option by asking its owner.

A plan (:class:`~ssmtrim.pruning.config.PruneConfig`) carries an option either as one of its own fields (the options
that folders written by earlier versions store at the top level: ``gap``, ``metric``, ``drop_fraction``) or in its
``options`` mapping (any option a plug-in declares); :meth:`PruneConfig.option` reads either, and gives the declared
default when the plan does not set it. A plug-in that declares a new option touches only its own file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssmtrim.errors import ConfigError

_CHANGES = [0]  # how many times a strategy or score was registered or unregistered


def declarations_changed() -> None:
    """A strategy or score was registered or unregistered: the declared options may differ."""
    _CHANGES[0] += 1


def declarations_version() -> int:
    """Changes with every registration, so that what is derived from the declarations can be kept between them (a
    forward reads an option's default without walking every plug-in, and a compiled graph guards on one number)."""
    return _CHANGES[0]


@dataclass(frozen=True)
class Option:
    """One option: its name (the plan key; ``--name-with-dashes`` on the command line), default, allowed values
    (``choices``) or numeric range, and what it does (one line for help texts)."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None  # numeric options: inclusive bounds
    high: float | None = None
    check: Callable[[Any], bool] | None = None  # any other condition

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """The value, converted as the default's type is (a number from text), or ConfigError in one sentence."""
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{self.flag} {value!r} is not one of {', '.join(map(str, self.choices))}.")
            return value
        if isinstance(self.default, (int, float)) and not isinstance(self.default, bool):
            try:
                number = type(self.default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{self.flag} takes a number, got {value!r}.") from None
            bad = math.isnan(number) or (self.low is not None and number < self.low) or \
                (self.high is not None and number > self.high)
            if bad:
                raise ConfigError(f"{self.flag} {value} is outside [{self.low}, {self.high}]; {self.help}.")
            value = number
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{self.flag} {value!r} is not valid: {self.help}.")
        return value


def parse_option(text: str, declared: dict[str, Option]) -> tuple[str, Any]:
    """``NAME=VALUE`` (the command line's ``--option``) -> (name, validated value)."""
    name, sep, value = text.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not sep or not name:
        raise ConfigError(f"--option takes NAME=VALUE, got {text!r}.")
    if name not in declared:
        raise ConfigError(f"--option {name}: no strategy or score declares it; declared: "
                          f"{', '.join(sorted(declared)) or 'none'}.")
    return name, declared[name].validate(value.strip())
