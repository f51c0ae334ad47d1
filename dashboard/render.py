"""`tern watch`'s screen, drawn with rich from a `ViewerState`.

Every string that came from the broker goes into a `rich.text.Text` as plain text, never
through rich's markup, so a status detail such as ``[blink]`` is shown, not obeyed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from dashboard.state import FleetNode, ViewerState
from tern.reports import RoundMetrics

__all__ = ["BLOCKS", "fleet_tree", "gateways_table", "rounds_table", "screen", "sparkline"]

BLOCKS = "▁▂▃▄▅▆▇█"
_STATE_STYLE = {"online": "green", "offline": "red", "unknown": "yellow"}


def sparkline(values: Sequence[float | None], width: int = 48) -> str:
    """The last `width` values as unicode blocks, scaled from their min to their max; a
    missing value is a space."""
    tail = list(values)[-width:]
    known = [v for v in tail if v is not None and math.isfinite(v)]
    if not known:
        return " " * len(tail)
    low, high = min(known), max(known)
    span = high - low

    def block(v: float | None) -> str:
        if v is None or not math.isfinite(v):
            return " "
        step = 0 if span == 0 else round((v - low) / span * (len(BLOCKS) - 1))
        return BLOCKS[len(BLOCKS) - 1 if span == 0 else step]

    return "".join(block(v) for v in tail)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def rounds_table(rounds: Sequence[RoundMetrics], limit: int = 10) -> Table:
    table = Table(title="rounds (coordinator)", expand=True)
    for name in ("round", "accuracy", "loss", "contributors", "dropped", "rejected"):
        table.add_column(name, justify="right" if name != "rejected" else "left")
    for name in ("up KiB", "down KiB", "s"):
        table.add_column(name, justify="right")
    for m in rounds[-limit:]:
        table.add_row(
            str(m.round),
            _num(m.accuracy, ".3f"),
            _num(m.loss, ".3f"),
            str(m.contributors),
            str(m.dropped),
            Text(_tally(m.rejected)),
            _kib(m.bytes_up),
            _kib(m.bytes_down),
            f"{m.round_seconds:.2f}",
        )
    return table


def gateways_table(state: ViewerState) -> Table:
    table = Table(title="gateways (last round each)", expand=True)
    for name in ("gateway", "round", "contributors", "dropped", "refused", "failed"):
        table.add_column(
            name, justify="left" if name in ("gateway", "refused", "failed") else "right"
        )
    for gid, m in sorted(state.gateway_rounds.items()):
        table.add_row(
            Text(gid),
            str(m.round),
            str(m.contributors),
            str(m.dropped),
            Text(_tally(m.rejected)),
            Text(_tally(m.failed)),
        )
    return table


def _label(node: FleetNode) -> Text:
    text = Text()
    text.append(node.id, style="bold")
    text.append(f" {node.role} ")
    text.append(node.state, style=_STATE_STYLE.get(node.state, ""))
    extra = []
    if node.activity:
        extra.append(node.activity)
    if node.last_round is not None:
        extra.append(f"round {node.last_round}")
    if node.telemetry is not None:
        t = node.telemetry
        extra.append(
            f"v{t.model_version} label {t.label} ({t.confidence:.2f}) {t.latency_us:,} us #{t.seq}"
        )
    if extra:
        text.append("  " + ", ".join(extra))
    for why in (node.last_error, node.detail):
        if why:
            text.append(f"  ({why})", style="dim")
    return text


def fleet_tree(root: FleetNode) -> Tree:
    tree = Tree(_label(root))

    def add(branch: Tree, node: FleetNode) -> None:
        for child in node.children:
            add(branch.add(_label(child)), child)

    add(tree, root)
    return tree


def screen(state: ViewerState, title: str) -> RenderableType:
    """Everything `tern watch` shows, in one renderable."""
    rounds = state.rounds
    accuracies = [m.accuracy for m in rounds]
    last = rounds[-1] if rounds else None
    head = Text(title, style="bold")
    head.append(f"   {time.strftime('%H:%M:%S')}")
    spark = Text("accuracy ")
    spark.append(sparkline(accuracies) or "(no round yet)", style="cyan")
    if last is not None:
        spark.append(f"  round {last.round}: {_num(last.accuracy, '.3f')}")
        if last.epsilon is not None:  # differential privacy: what is spent so far
            spark.append(f"  epsilon {last.epsilon:.3g}")
    refused = Text(f"messages {state.messages}; refused: {_tally(dict(state.refused))}", "dim")
    return Group(
        head,
        Panel(spark),
        rounds_table(rounds),
        gateways_table(state),
        Panel(fleet_tree(state.tree()), title="fleet"),
        refused,
    )
