"""Errors that carry every problem found, each with the fix."""

from __future__ import annotations

from collections.abc import Iterable


class MedsiloError(Exception):
    """Base class for errors medsilo reports to a user without a traceback."""


class ConfigError(MedsiloError):
    """One or more invalid settings, reported together.

    Parameters
    ----------
    problems
        Each entry names the setting, the value received and the fix.

    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class DataError(MedsiloError):
    """A data file is missing, corrupt or unsuitable."""


class NothingAggregated(MedsiloError):
    """A run ended without aggregating any round: there is no trained model, and the run failed.

    Parameters
    ----------
    reasons
        Each distinct reason, with the sites that gave it (a refusal, a failure, a halted secure sum).

    """

    def __init__(self, reasons: Iterable[str]) -> None:
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"no round was aggregated, so this run has no trained model (none was written):\n{lines}")


class Problems:
    """Collects validation problems so that all of them are reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, problem: str) -> None:
        """Record one problem (setting, value, fix)."""
        self.items.append(problem)

    def check(self, ok: bool, problem: str) -> bool:
        """Record ``problem`` unless ``ok``; return ``ok``."""
        if not ok:
            self.add(problem)
        return ok

    def raise_if_any(self) -> None:
        """Raise a :class:`ConfigError` listing every recorded problem."""
        if self.items:
            raise ConfigError(self.items)
