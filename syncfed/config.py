"""Frozen settings of a worker and of a coordinator, with their defaults.

The command-line tools build these from flags; library users build them
directly. Validation happens on construction, so a config that exists is
usable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .aggregation import AGGREGATORS
from .datasets import DATASETS
from .exceptions import ConfigError
from .protocol import MAX_PLAN_SIZE

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_WORKERS",
    "DEFAULT_EVALUATOR",
    "WorkerConfig",
    "CoordinatorConfig",
    "parse_endpoints",
]

# Limits
#: Large enough for a 100M-parameter float32 model (400 MB) plus framing.
DEFAULT_MAX_MESSAGE_SIZE: Final = 512 * 2**20

# Timeouts
DEFAULT_CONNECT_TIMEOUT: Final = 30.0
DEFAULT_REQUEST_TIMEOUT: Final = 600.0
DEFAULT_ROUND_TIMEOUT: Final = 600.0
DEFAULT_PING_INTERVAL: Final = 1.0
DEFAULT_PING_TIMEOUT: Final = 3.0
DEFAULT_RECONNECT_MAX_DELAY: Final = 30.0

DEFAULT_WORKERS: Final = "alice=ws://localhost:8777,bob=ws://localhost:8778,charlie=ws://localhost:8779"
DEFAULT_EVALUATOR: Final = "testing=ws://localhost:8780"


def parse_endpoints(text: str) -> dict[str, str]:
    """Parse ``"alice=ws://host:8777,bob=ws://host:8778"`` into ``{id: uri}``.

    Raises:
        ConfigError: if an entry lacks ``=``, a uri is not ws:// or wss://, or an id repeats.
    """
    endpoints: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, uri = entry.partition("=")
        if not sep or not name or not uri.startswith(("ws://", "wss://")):
            raise ConfigError(f"worker entry {entry!r} must look like alice=ws://localhost:8777")
        if name in endpoints:
            raise ConfigError(f"worker id {name!r} appears twice")
        endpoints[name] = uri
    return endpoints


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker serves: who it is, what it holds, its limits."""

    worker_id: str
    host: str = "localhost"
    port: int = 8777
    testing: bool = False
    dataset: str = "digits"
    data_dir: Path = Path("data")
    digits: tuple[int, ...] | None = None  # None: by worker id, or all for the evaluator
    models: tuple[str, ...] = ()  # import paths of user models this worker may build
    cuda: bool = False
    threads: int | None = None  # torch threads; None keeps torch's default
    download: bool = True
    # Limits
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_in_flight: int = 8  # concurrent requests per connection
    max_connections: int = 64
    # Drills
    batch_delay: float = 0.0  # seconds of sleep per training batch, to simulate a slow site
    # Security
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # require client certificates signed by this CA
    allow_coordinators: tuple[str, ...] = ()  # certificate common names let in; empty: any the CA signed
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ConfigError("worker id must not be empty")
        if self.dataset not in DATASETS:
            raise ConfigError(f"data set {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not in 0..65535")
        if self.max_message_size < 1024:
            raise ConfigError(f"max message size {self.max_message_size} is below the minimum of 1024 bytes")
        if self.max_in_flight < 1:
            raise ConfigError("max in-flight requests must be at least 1")
        if self.max_connections < 1:
            raise ConfigError("max connections must be at least 1")
        _check_tls(self.tls_cert, self.tls_key)
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS")
        if self.allow_coordinators and self.tls_ca is None:
            raise ConfigError("--allow-coordinator needs --tls-ca: identities come from client certificates")
        if not (math.isfinite(self.batch_delay) and self.batch_delay >= 0):
            raise ConfigError(f"batch delay must be a non-negative number of seconds, not {self.batch_delay!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")

    @property
    def secured(self) -> bool:
        """Whether peers must prove who they are (TLS with client certificates, or a token)."""
        return self.tls_ca is not None or self.auth_token_file is not None

    @property
    def role(self) -> str:
        return "evaluator" if self.testing else "trainer"


@dataclass(frozen=True)
class CoordinatorConfig:
    """A federated training run: who takes part, the recipe, limits and outputs."""

    workers: dict[str, str] = field(default_factory=lambda: parse_endpoints(DEFAULT_WORKERS))
    evaluator: dict[str, str] = field(default_factory=lambda: parse_endpoints(DEFAULT_EVALUATOR))
    model: str | None = None  # None: the default model of the workers' data set
    training_rounds: int = 40
    federate_after_n_batches: int = 10
    batch_size: int = 32
    test_batch_size: int = 128
    lr: float = 0.1
    lr_decay: float = 0.98
    lr_min: float = 0.001
    seed: int = 1
    aggregation: str = "fedavg"
    eval_every: int = 10
    save_model: Path | None = None
    metrics_out: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    # Reliability
    min_workers: int | None = None  # quorum; None: every training worker
    max_round_retries: int = 3
    # Limits
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    # Timeouts
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # evaluation replies
    round_timeout: float = DEFAULT_ROUND_TIMEOUT  # training replies
    ping_interval: float | None = DEFAULT_PING_INTERVAL  # None: no liveness pings
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT
    reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY
    # Security
    tls_ca: Path | None = None  # verify wss:// workers against this CA (the system's when None)
    tls_cert: Path | None = None  # client certificate for mutual TLS
    tls_key: Path | None = None
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.workers:
            raise ConfigError("at least one training worker is needed")
        if len(self.evaluator) > 1:
            raise ConfigError(f"at most one evaluator is supported, got {len(self.evaluator)}")
        overlap = set(self.workers) & set(self.evaluator)
        if overlap:
            raise ConfigError(f"worker id {sorted(overlap)[0]!r} is both a trainer and the evaluator")
        for name in ("training_rounds", "federate_after_n_batches", "batch_size", "test_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("federate_after_n_batches", "batch_size", "test_batch_size"):
            if getattr(self, name) > MAX_PLAN_SIZE:
                raise ConfigError(f"{name} {getattr(self, name)} exceeds limit of {MAX_PLAN_SIZE}")
        if self.save_model is not None and self.save_model.is_dir():
            raise ConfigError(f"--save-model {self.save_model} is a folder; name a file")
        if self.metrics_out is not None and self.metrics_out.is_dir():
            raise ConfigError(f"--metrics-out {self.metrics_out} is a folder; name a file")
        for name in (
            "lr",
            "lr_decay",
            "lr_min",
            "connect_timeout",
            "request_timeout",
            "round_timeout",
            "ping_interval",
            "ping_timeout",
            "reconnect_max_delay",
        ):
            _positive(name, getattr(self, name))
        if self.min_workers is not None and not 1 <= self.min_workers <= len(self.workers):
            raise ConfigError(
                f"min_workers {self.min_workers} is not between 1 and {len(self.workers)} training workers"
            )
        if self.max_round_retries < 0:
            raise ConfigError(f"max_round_retries must not be negative, not {self.max_round_retries}")
        _check_tls(self.tls_cert, self.tls_key)
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs --checkpoint-dir")
        if self.aggregation not in AGGREGATORS:
            raise ConfigError(f"aggregation {self.aggregation!r} is not one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed {self.seed} is not in 0..{2**32 - 1}")
        if self.max_message_size < 1024:
            raise ConfigError(f"max message size {self.max_message_size} is below the minimum of 1024 bytes")

    @property
    def quorum(self) -> int:
        """How many training workers must contribute for a round to count."""
        return len(self.workers) if self.min_workers is None else self.min_workers

    def learning_rate(self, round_number: int) -> float:
        """``lr`` decayed by ``lr_decay`` each round, never below ``lr_min``."""
        return max(self.lr * self.lr_decay ** (round_number - 1), self.lr_min)

    def is_eval_round(self, round_number: int) -> bool:
        """Rounds 1, 1 + eval_every, 1 + 2 * eval_every, ... and the last."""
        return (round_number - 1) % self.eval_every == 0 or round_number == self.training_rounds
