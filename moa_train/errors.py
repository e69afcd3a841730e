"""User-facing errors, printed as one paragraph by the CLI (never a traceback), and the value checks
every config group shares to raise them."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (config, files, data, resume state)."""


class ConfigError(UserError):
    def __init__(self, key: str, problem: str, accepted: str | None = None):
        self.key = key
        message = f"config key '{key}': {problem}"
        if accepted:
            message += f" Accepted: {accepted}."
        super().__init__(message)


class DataError(UserError):
    pass


def check_choice(key: str, value, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(key, f"unknown value '{value}'.", ", ".join(accepted))


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    """None passes: an optional key left unset."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"got {value}, must be {'>= 0' if allow_zero else '> 0'}.")


def check_fraction(key: str, value, closed_above: bool = True) -> None:
    if not (0.0 <= value <= 1.0 if closed_above else 0.0 <= value < 1.0):
        raise ConfigError(key, f"got {value}, must lie in [0, 1{']' if closed_above else ')'}.")


class RunFailed(Exception):
    """A run that stopped without completing for a reason of its own (a diverged loss): summary.json records
    it, and the process exits non-zero without a traceback."""
