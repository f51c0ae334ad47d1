"""The coordinator's configuration and its errors: one frozen value, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import TransportError
from broker.transport import TlsClient, parse_url
from coordinator.compression import compression_refusal
from coordinator.privacy import PrivacyConfig
from kernels.wasm import DEFAULT_FUEL, DEFAULT_MEMORY_LIMIT
from tern.codecs import CodecName
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.logins import Login
from tern.messages import DEFAULT_MAX_NORM, DEFAULT_MAX_WEIGHT, TrainConfig
from tern.policy import StrategySpec
from tern.strategies import strategy_from

__all__ = ["ConfigError", "CoordinatorConfig", "CoordinatorError", "RoundTimeout"]


class CoordinatorError(Exception):
    """Base of every error the coordinator raises."""


class ConfigError(CoordinatorError):
    """A configuration value is not valid; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RoundTimeout(CoordinatorError):
    """A wait for round `round` passed its deadline of `timeout` seconds."""

    def __init__(self, round: int, timeout: float) -> None:
        super().__init__(f"round {round} did not close within {timeout} s")
        self.round = round
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything a coordinator needs besides the fleet file, its key and a test set.

    `rounds` is the last round number to run (None: run until stopped); a coordinator
    resumed past it finishes at once. `interval` is the least time between two round
    openings (0: back to back). `connect_timeout`: seconds to wait for the broker at
    start (None: wait without end). `keep_models`: model versions its state directory
    keeps, the newest (coordinator.store). `tls`: the fleet CA (and its client
    certificate) for an ``mqtts://`` broker URL, which needs it (broker.tls.client_tls).
    """

    broker_url: str
    state_dir: Path
    layers: tuple[int, ...] = (40, 100, 100, 10)
    init_seed: int = 0
    codec: CodecName = CodecName.TERNARY
    rounds: int | None = None
    interval: float = 0.0
    round_timeout: float = 30.0
    min_contributors: int = 1
    fraction: float = 1.0
    seed: int = 0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    kernel_fuel: int = DEFAULT_FUEL  # per device per round, named in every schedule
    kernel_memory: int = DEFAULT_MEMORY_LIMIT  # bytes of Wasm linear memory, likewise
    client_id: str = COORDINATOR
    connect_timeout: float | None = 10.0
    max_weight: float = DEFAULT_MAX_WEIGHT  # a device's update, unless the fleet file says
    max_norm: float = DEFAULT_MAX_NORM  # of an update's mean delta (sum / weight)
    login: Login | None = None  # its broker login (tern fleet init: coordinator.login)
    keep_models: int = 5  # coordinator.store.DEFAULT_KEEP_MODELS
    # The server step (tern.strategies): "fedavg" takes server_lr and server_momentum;
    # another strategy takes its parameters here (tern.policy.STRATEGY_PARAMS), by name.
    strategy: str = "fedavg"
    strategy_params: tuple[tuple[str, float], ...] = ()
    tls: TlsClient | None = None
    # Secure aggregation and differential privacy (coordinator.privacy): off by default.
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # The gateways' partials (tern.rounds.uplink; float32: the exact sum) and a sparse
    # codec's density (coordinator.compression; the command line's default is ternary).
    partials: CodecName = CodecName.FLOAT32
    density: float | None = None
    # How models go down (tern.downlink): deltas in this codec; None: full models (exact).
    downlink: CodecName | None = None
    # Messages whose MQTT packet exceeds this many bytes go in chunks (broker.chunking).
    max_message_bytes: int | None = None

    def strategy_spec(self) -> StrategySpec:
        """The server step as the schedule's policy names it (defaults left out)."""
        params = dict(self.strategy_params)
        if self.strategy == "fedavg":
            params = {"lr": self.server_lr, "momentum": self.server_momentum, **params}
        return StrategySpec.of(self.strategy, **params)

    def __post_init__(self) -> None:
        checks = [
            (
                "layers",
                len(self.layers) >= 2 and all(n >= 1 for n in self.layers),
                "at least two positive layer sizes",
            ),
            ("init_seed", self.init_seed >= 0, "must be >= 0"),
            ("rounds", self.rounds is None or self.rounds >= 1, "must be >= 1"),
            ("interval", math.isfinite(self.interval) and self.interval >= 0, "must be >= 0"),
            (
                "round_timeout",
                math.isfinite(self.round_timeout) and self.round_timeout > 0,
                "must be > 0",
            ),
            ("min_contributors", self.min_contributors >= 1, "must be >= 1"),
            ("fraction", 0 < self.fraction <= 1, "must be in (0, 1]"),
            ("seed", 0 <= self.seed < 2**32, "must be in [0, 2**32)"),
            ("server_lr", math.isfinite(self.server_lr) and self.server_lr > 0, "must be > 0"),
            ("server_momentum", 0 <= self.server_momentum < 1, "must be in [0, 1)"),
            (
                "connect_timeout",
                self.connect_timeout is None
                or (math.isfinite(self.connect_timeout) and self.connect_timeout >= 0),
                "must be None or >= 0",
            ),
            (
                "keep_models",
                isinstance(self.keep_models, int)
                and not isinstance(self.keep_models, bool)
                and self.keep_models >= 1,
                "must be an integer >= 1",
            ),
            ("kernel_fuel", 0 < self.kernel_fuel < 2**63, "must be in [1, 2**63)"),
            ("kernel_memory", 65536 <= self.kernel_memory < 2**32, "must be in [64 KiB, 4 GiB)"),
            (
                "max_weight",
                math.isfinite(self.max_weight) and self.max_weight >= 1,
                "must be finite and >= 1",
            ),
            ("max_norm", math.isfinite(self.max_norm) and self.max_norm > 0, "must be > 0"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(name, f"{message}, got {getattr(self, name)!r}")
        try:
            secure = parse_url(self.broker_url).tls
        except TransportError as exc:
            raise ConfigError("broker_url", str(exc)) from exc
        if secure != (self.tls is not None):
            needs = "it needs the fleet CA (--ca-file)" if secure else "TLS settings given"
            raise ConfigError("tls", f"{self.broker_url} is {'' if secure else 'not '}TLS: {needs}")
        if self.strategy != "fedavg" and (self.server_lr, self.server_momentum) != (1.0, 0.0):
            raise ConfigError(
                "server_lr", f"server_lr and server_momentum are FedAvg's; give {self.strategy}"
                " its parameters as strategy_params (--strategy-param lr=...)",
            )  # fmt: skip
        try:
            strategy_from(self.strategy_spec())
        except (TernError, ValueError) as exc:
            raise ConfigError("strategy", str(exc)) from exc
        wrong = self.privacy.refusal(self.rounds, self.codec)
        if wrong is not None:
            raise ConfigError("privacy", wrong)
        refused = compression_refusal(
            self.codec, self.partials, self.density, self.privacy.dp_terms_unset(), self.downlink
        )
        if refused is not None:
            raise ConfigError(*refused)
