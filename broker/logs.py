"""Log lines people can read, or JSON lines programs can: one setup for every process.

`setup_logging(component, quiet, json_lines)` puts one handler on the root logger (on
stderr): text lines, or with `json_lines` one JSON object per line,
``{"t": ISO 8601, "level": "info", "component": id, "event": "round", ...fields,
"message": text}``. `quiet` leaves warnings and errors only.

The per-round lines are made here and nowhere else, from the structured values the round
machines hand their processes (`tern.reports.RoundMetrics` for the coordinator and each
gateway, `tern.rounds.device.RoundOutcome` for a device): the text and the JSON fields
come from the same numbers, so a dashboard and a person read the same round.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from broker.lifecycle import quiet_third_party_logs
from tern.reports import RoundMetrics
from tern.rounds.device import RoundOutcome

__all__ = [
    "JsonFormatter",
    "RunTally",
    "add_log_arguments",
    "human_bytes",
    "log_device_round",
    "log_event",
    "log_round",
    "setup_logging",
]

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_MAX_TALLY_SHOWN = 4  # reasons named in a round line; the rest are in the total


def setup_logging(
    component: str,
    quiet: bool = False,
    json_lines: bool = False,
    *,
    verbose: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Log to `stream` (stderr) as `component`: INFO and above, WARNING and above when
    `quiet`; third-party chatter (amqtt) only with `verbose`. Replaces any handler set
    before, so calling it twice (tests) does not double every line."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if json_lines:
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    if not verbose:
        quiet_third_party_logs()
    return handler


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, component, event, its fields, message."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC)
        doc: dict[str, Any] = {
            "t": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "component": self.component,
            "event": getattr(record, "event", "log"),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            doc.update({k: v for k, v in fields.items() if k not in doc})
        doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, allow_nan=False, ensure_ascii=False)


def log_event(
    logger: logging.Logger,
    event: str,
    text: str,
    fields: Mapping[str, object],
    level: int = logging.INFO,
) -> None:
    """`text` as a log line; with --log-json, `event` and `fields` as its JSON object."""
    logger.log(level, "%s", text, extra={"event": event, "fields": dict(fields)})


def human_bytes(n: float) -> str:
    """1234 -> "1.23 KB": three significant digits, powers of 1000."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tally(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    named = ", ".join(f"{why} {n}" for why, n in top[:_MAX_TALLY_SHOWN])
    more = ", ..." if len(top) > _MAX_TALLY_SHOWN else ""
    return f"{total} ({named}{more})"


def round_text(m: RoundMetrics, ok: bool = True) -> str:
    """``round 12  acc 0.812  loss 0.55  contributors 20  dropped 0  rejected 0  up 68.1 KB
    down 122 KB  1.9 s``: accuracy and loss when known, failures when any."""
    parts = [f"round {m.round}" + ("" if ok else " FAILED")]
    if m.accuracy is not None:
        parts.append(f"acc {m.accuracy:.3f}")
    if m.loss is not None:
        parts.append(f"loss {m.loss:.3g}")
    parts += [f"contributors {m.contributors}", f"dropped {m.dropped}"]
    if m.failed:
        parts.append(f"failed {_tally(m.failed)}")
    parts.append(f"rejected {_tally(m.rejected)}")
    parts += [f"up {human_bytes(m.bytes_up)}", f"down {human_bytes(m.bytes_down)}"]
    parts.append(f"{m.round_seconds:.1f} s")
    return "  ".join(parts)


def log_round(logger: logging.Logger, m: RoundMetrics, ok: bool = True, who: str = "") -> None:
    """The one line of a round closed at the coordinator or a gateway (`who`: a prefix
    naming it, ``gateway gw-1``, where several may share a log)."""
    fields = {
        "round": m.round,
        "ok": ok,
        "model_version": m.model_version,
        "accuracy": m.accuracy,
        "loss": m.loss,
        "contributors": m.contributors,
        "dropped": m.dropped,
        "rejected": dict(m.rejected),
        "failed": dict(m.failed),
        "bytes_up": m.bytes_up,
        "bytes_down": m.bytes_down,
        "round_seconds": m.round_seconds,
    }
    log_event(logger, "round", f"{who}: {round_text(m, ok)}" if who else round_text(m, ok), fields)


def log_device_round(logger: logging.Logger, device: str, o: RoundOutcome) -> None:
    """A device's round: what it trained and sent, or why it skipped the round."""
    fields: dict[str, object] = {
        "device": device,
        "round": o.round,
        "model_version": o.model_version,
    }
    if o.error or o.reason:
        fields.update(skipped=True, reason=o.reason, error=o.error)
        text = f"device {device}: round {o.round}  skipped: {o.reason or 'error'}: {o.error}"
        log_event(logger, "round_skipped", text, fields, logging.WARNING)
        return
    fields.update(skipped=False, samples=o.samples, train_seconds=round(o.train_seconds, 3),
                  bytes_sent=o.update_bytes, kernel=o.kernel)  # fmt: skip
    text = (
        f"device {device}: round {o.round}  trained {o.samples} samples in {o.train_seconds:.2f} s"
        f"  sent {human_bytes(o.update_bytes)}"
    )
    log_event(logger, "round", text, fields)


@dataclass(slots=True)
class RunTally:
    """What a coordinator's run did, round by round, for its closing summary."""

    rounds: int = 0
    failed_rounds: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    best: tuple[float, int] | None = None  # (accuracy, round)
    final: RoundMetrics | None = None
    rejected: dict[str, int] = field(default_factory=dict)

    def add(self, m: RoundMetrics, ok: bool = True) -> None:
        self.rounds += 1
        self.failed_rounds += 0 if ok else 1
        self.bytes_up += m.bytes_up
        self.bytes_down += m.bytes_down
        self.seconds += m.round_seconds
        for why, n in m.rejected.items():
            self.rejected[why] = self.rejected.get(why, 0) + n
        if m.accuracy is not None and (self.best is None or m.accuracy > self.best[0]):
            self.best = (m.accuracy, m.round)
        self.final = m

    def fields(self, wall: float | None = None) -> dict[str, object]:
        final = self.final
        return {
            "run_seconds": None if wall is None else round(wall, 3),
            "rounds": self.rounds,
            "failed_rounds": self.failed_rounds,
            "last_round": None if final is None else final.round,
            "best_accuracy": None if self.best is None else self.best[0],
            "best_round": None if self.best is None else self.best[1],
            "final_accuracy": None if final is None else final.accuracy,
            "final_loss": None if final is None else final.loss,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "round_seconds": round(self.seconds, 3),
            "rejected": dict(self.rejected),
        }

    def text(self, wall: float | None = None) -> str:
        parts = [f"summary: {self.rounds} round{'' if self.rounds == 1 else 's'}"]
        if wall is not None:
            parts[0] += f" in {wall:.1f} s"
        if self.failed_rounds:
            parts.append(f"{self.failed_rounds} failed")
        if self.best is not None:
            parts.append(f"best acc {self.best[0]:.3f} (round {self.best[1]})")
        final = self.final
        if final is not None and final.accuracy is not None:
            parts.append(f"final acc {final.accuracy:.3f}")
        if final is not None and final.loss is not None:
            parts.append(f"loss {final.loss:.3g}")
        parts.append(f"rejected {_tally(self.rejected)}")
        parts += [f"up {human_bytes(self.bytes_up)}", f"down {human_bytes(self.bytes_down)}"]
        parts.append(f"{self.seconds:.1f} s in rounds")
        return "  ".join(parts)

    def log(self, logger: logging.Logger, wall: float | None = None) -> None:
        """The summary line; `wall`: seconds since the run started, when known."""
        log_event(logger, "summary", self.text(wall), self.fields(wall))


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    """`-q/--quiet` and `--log-json`, the same on every component's command line."""
    p.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only (no round lines)"
    )
    p.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object per line (t, level, component, event, fields, message)",
    )
