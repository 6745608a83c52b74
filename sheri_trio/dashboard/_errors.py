"""The dashboard's errors: each message says what is wrong and what to do."""

from __future__ import annotations

__all__ = ["DashboardError", "HistoryError"]


class DashboardError(RuntimeError):
    """The dashboard cannot run (the history, the port, the broker's answer)."""


class HistoryError(DashboardError):
    """The history file cannot be used: corrupt, locked, or not writable."""
