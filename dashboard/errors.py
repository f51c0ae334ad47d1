"""The dashboard component's one exception base."""

from __future__ import annotations

__all__ = ["DashboardError"]


class DashboardError(Exception):
    """`tern watch` or `tern dashboard` cannot start: a bad flag, login file or broker URL."""
