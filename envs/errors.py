"""The error every layer raises for a bad option: :class:`ConfigError` names the field, the problem and the fix (the
CLIs print it as one ``error:`` line). It lives here, at the bottom layer, so that env code can raise it without
importing upwards; :mod:`jaxrl_pref.config` exports it with the rest of the config helpers."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid. The message names the field and how to fix it."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")


def require(cond: bool, field: str, problem: str, fix: str) -> None:
    if not cond:
        raise ConfigError(field, problem, fix)
