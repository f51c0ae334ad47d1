"""Watching a fleet: `tern watch` (a live terminal view) and `tern dashboard` (a web page).

Both log in to a broker as the fleet's read-only observer and read only the JSON topics
of topics.md: metrics, status, gateways' views of their devices, and board telemetry.
`dashboard.state` is the pure model of what a viewer knows; `dashboard.render` draws it
with rich; `dashboard.watch` and `dashboard.server` are the two commands.
"""

from dashboard.errors import DashboardError
from dashboard.state import FleetNode, ViewerState

__all__ = ["DashboardError", "FleetNode", "ViewerState"]
