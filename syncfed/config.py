"""Frozen settings of a worker and of a coordinator, with their defaults.

The command-line tools build these from flags; library users build them
directly. Validation happens on construction, so a config that exists is
usable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from .compression import COMPRESSIONS
from .data.base import SourceOptions
from .data.normalization import NORMALIZATIONS
from .datasets import DATASETS, DatasetSpec, check_dataset_key
from .exceptions import ConfigError
from .masking import MAX_CLIENTS
from .protocol import (
    DEFAULT_CHUNK_SIZE,
    LOSSES,
    MAX_HIDDEN,
    MAX_HUBER_DELTA,
    MAX_LOCAL_EPOCHS,
    MAX_PLAN_SIZE,
    MAX_WEIGHT_DECAY,
    MAX_WIDTH,
    OPTIMIZERS,
    TASK_KINDS,
)
from .staleness import staleness_weight
from .strategies import make_strategy

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_RECEIVE_SLOTS",
    "DEFAULT_WORKERS",
    "DEFAULT_EVALUATOR",
    "WorkerConfig",
    "CoordinatorConfig",
    "parse_endpoints",
    "parse_listen",
    "url_host",
    "DIAL_IN",
    "ATTACKS",
    "DP_MODES",
    "TASKS",
    "CLASS_WEIGHTS",
]

# Limits
#: Large enough for a 100M-parameter float32 model (400 MB) plus framing.
DEFAULT_MAX_MESSAGE_SIZE: Final = 512 * 2**20
#: Fragments smaller than this would cost more in framing than they save in memory.
MIN_CHUNK_SIZE: Final = 64 * 2**10
#: A table encoded as a plan says (one float32 per example and one-hot slot) that a worker will hold: the
#: plan's vocabularies size it, so without a bound a coordinator could ask for more memory than the machine has.
DEFAULT_MAX_PREPARED_BYTES: Final = 2 * 2**30
#: Training updates the coordinator receives at once; finished workers hold theirs until a slot frees.
DEFAULT_RECEIVE_SLOTS: Final = 2
#: The learning rate decays or stays: a factor above 1 would grow it past any float in a few hundred rounds.
MAX_LR_DECAY: Final = 1.0
#: The longest ``--target-units`` ("days", "mmol/L"): a word or two shown after every MAE and RMSE.
MAX_UNITS: Final = 32

# Timeouts
DEFAULT_CONNECT_TIMEOUT: Final = 30.0
DEFAULT_REQUEST_TIMEOUT: Final = 600.0
#: Each federated-normalisation query reads a site's whole data: an image folder of 100,000 files, decoded
#: once per channel (twice under secure aggregation), takes far longer than an evaluation reply.
DEFAULT_STATISTICS_TIMEOUT: Final = 3600.0
DEFAULT_ROUND_TIMEOUT: Final = 600.0
DEFAULT_PING_INTERVAL: Final = 1.0
DEFAULT_PING_TIMEOUT: Final = 3.0
DEFAULT_RECONNECT_MAX_DELAY: Final = 30.0
#: A worker's wait for a new connection to authenticate (token, or hello without one): one round trip
#: when all is well, with room for a coordinator that opens many connections on a loaded machine.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: A worker closes a connection that sent no request for this long with none in flight or held: above the
#: longest quiet a normal run leaves (a round retried 3 times at the 600 s round timeout, then evaluation).
DEFAULT_IDLE_TIMEOUT: Final = 3600.0

#: Test hooks: how a byzantine worker corrupts its update ``delta = w - w_global``
#: (sign flipping and boosting as in the robust-aggregation literature, e.g.
#: Fang et al. 2020, "Local Model Poisoning Attacks to Byzantine-Robust FL").
ATTACKS: Final = {
    "sign-flip": "sends w_global - 10 * delta",
    "scale": "sends w_global + 50 * delta",
    "noise": "sends w_global + delta + Gaussian noise of standard deviation 1",
    "nan": "sends NaN in every float tensor, as a diverged or broken worker would",
}

#: Differential privacy modes: who adds the noise (docs/privacy.md).
DP_MODES: Final = ("central", "distributed")

#: ``--task``: ``auto`` decides from the workers' agreed data; any other value is an import path ``mypkg.tasks:Task``.
TASKS: Final = ("auto", *TASK_KINDS)
#: ``--class-weights``: ``balanced`` weighs class c by n / (C * n_c), from the federated label histogram.
CLASS_WEIGHTS: Final = ("balanced",)

DEFAULT_WORKERS: Final = "alice=ws://localhost:8777,bob=ws://localhost:8778,charlie=ws://localhost:8779"
DEFAULT_EVALUATOR: Final = "testing=ws://localhost:8780"


#: A worker's address in ``--workers``/``--evaluator`` when it connects to the coordinator's ``--listen``.
DIAL_IN: Final = "dial-in"
#: A worker id a dial-out worker may claim: it travels in an HTTP header and in file names.
_WORKER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_endpoints(text: str, *, dial_in: bool = False) -> dict[str, str]:
    """Parse ``"alice=ws://host:8777,bob=ws://host:8778"`` into ``{id: uri}``; with ``dial_in``,
    ``bob=dial-in`` too: bob connects to the coordinator's ``--listen`` address.

    Raises:
        ConfigError: if an entry lacks ``=``, a uri is not ws:// or wss:// (or dial-in), or an id repeats.
    """
    endpoints: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, uri = entry.partition("=")
        if dial_in and sep and uri == DIAL_IN:
            if not _WORKER_ID.fullmatch(name):
                raise ConfigError(f"dial-in worker id {name!r} must be letters, digits, '.', '_' or '-', up to 64")
        elif not sep or not name or not uri.startswith(("ws://", "wss://")):
            raise ConfigError(f"worker entry {entry!r} must look like alice=ws://localhost:8777")
        if name in endpoints:
            raise ConfigError(f"worker id {name!r} appears twice")
        endpoints[name] = uri
    return endpoints


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    """Parse the ``HOST:PORT`` of ``flag`` (``[::1]:8765`` for IPv6; port 0: a free one).

    Raises:
        ConfigError: if the port is missing or not in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{flag} {text!r} must look like 0.0.0.0:8765")
    return host.strip("[]"), int(port)


def url_host(host: str) -> str:
    """``host`` as a URL has it: an IPv6 address in brackets (the reverse of :func:`parse_listen`)."""
    return f"[{host}]" if ":" in host else host


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")


def _is_task_path(task: str) -> bool:
    """Whether ``task`` reads as an import path ``mypkg.tasks:Task`` (the worker resolves it, never the coordinator)."""
    module, sep, name = task.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and name.isidentifier()


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
    shard: tuple[int, int] | None = None  # (k, n): the k-th (0-based) of n seeded IID shards, instead of classes
    shard_seed: int = 0
    # A user's own data instead of ``dataset`` (docs/data.md): a spec such as csv:claims.csv or images:xray/train,
    # read with ``source_options``, whose minimum group size is always the worker's own (``min_group_size``)
    data: str | None = None
    source_options: SourceOptions = field(default_factory=SourceOptions)
    # Validation and named data sets (federated evaluation, the data-set registry)
    val_fraction: float = 0.1  # share of a trainer's examples held out for validation, never trained on
    val_seed: int | None = None  # seed of the hold-out; None: derived from the worker id
    datasets: tuple[DatasetSpec, ...] = ()  # named data sets (--dataset-spec); empty: the one ``dataset`` names
    models: tuple[str, ...] = ()  # import paths of user models (or built-in names) this worker may build
    bench_models: bool = False  # also serve the benchmark MLPs of models.BENCH_MODELS (up to 100M parameters)
    tasks: tuple[str, ...] = ()  # import paths of user tasks (mypkg.tasks:Task) a request's recipe may name
    state_dir: Path | None = None  # where optimizer state kept between rounds (keep_state) is saved; None: memory
    cuda: bool = False
    threads: int | None = None  # torch threads; None keeps torch's default, or shares the cores (share_cores)
    # With threads None: before each job, torch's threads are this process's share of the host's cores among the
    # syncfed workers running on it (syncfed.worker.cores). The command line's workers do; an embedded one does not.
    share_cores: bool = False
    download: bool = True
    # Limits
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_in_flight: int = 8  # concurrent requests per connection
    max_connections: int = 64  # authenticated connections; see syncfed.admission
    max_pending_connections: int = 64  # connections still authenticating; a newcomer evicts the oldest
    chunk_size: int = DEFAULT_CHUNK_SIZE  # larger messages are streamed in fragments of this size
    max_secagg_clients: int = 1024  # largest secure aggregation round (clients, so neighbours too) it joins
    max_prepared_bytes: int = DEFAULT_MAX_PREPARED_BYTES  # a table encoded as a plan says; a larger one is refused
    # Privacy
    min_group_size: int = 10  # analytics answers never describe fewer examples than this
    withhold_histogram: bool = False  # hello sends no class histogram, only a power-of-two bound on its size
    dp_sgd_noise_multiplier: float | None = None  # z: example-level DP-SGD (Abadi et al. 2016); None: off
    dp_sgd_clip: float = 1.0  # C: each example's gradient is scaled down to this L2 norm
    dp_sgd_delta: float = 1e-5  # the delta the worker reports its epsilon at
    # Drills
    batch_delay: float = 0.0  # seconds of sleep per training batch, to simulate a slow site
    attack: str | None = None  # test hook: send corrupted updates (see training.ATTACKS)
    # Security
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # require client certificates signed by this CA
    allow_coordinators: tuple[str, ...] = ()  # certificate common names let in; empty: any the CA signed
    auth_token_file: Path | None = None
    policy: Path | None = None  # the site's policy (syncfed.policy): which jobs its data may serve; None: any
    # Dialing out (--connect): no listening socket; the coordinator's --listen address instead
    connect: str | None = None
    redial_max_delay: float = 30.0  # cap of the jittered backoff between dial attempts
    # Timeouts
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT  # TLS, HTTP upgrade, then the token or hello
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT  # no request (pings aside) for this long; None or 0: off

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ConfigError("worker id must not be empty")
        if self.dataset not in DATASETS:
            raise ConfigError(f"data set {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not in 0..65535")
        if self.max_message_size < 1024:
            raise ConfigError(f"max message size {self.max_message_size} is below the minimum of 1024 bytes")
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise ConfigError(f"chunk size {self.chunk_size} is below the minimum of {MIN_CHUNK_SIZE} bytes")
        if self.max_in_flight < 1:
            raise ConfigError("max in-flight requests must be at least 1")
        if self.max_connections < 1:
            raise ConfigError("max connections must be at least 1")
        if self.max_pending_connections < 1:
            raise ConfigError(f"max pending connections {self.max_pending_connections} is below the minimum of 1")
        _positive("handshake_timeout", self.handshake_timeout)
        if self.idle_timeout is not None and not (math.isfinite(self.idle_timeout) and self.idle_timeout >= 0):
            raise ConfigError(f"idle_timeout must be a non-negative number of seconds, not {self.idle_timeout!r}")
        if self.max_prepared_bytes < 1:
            raise ConfigError(f"max prepared bytes {self.max_prepared_bytes} is below the minimum of 1 byte")
        if not 2 <= self.max_secagg_clients <= MAX_CLIENTS:
            raise ConfigError(f"max secure aggregation clients {self.max_secagg_clients} is not in 2..{MAX_CLIENTS}")
        _check_tls(self.tls_cert, self.tls_key)
        if self.tls_ca is not None and self.tls_cert is None and self.connect is None:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS")
        if self.connect is not None:
            if not self.connect.startswith(("ws://", "wss://")):
                raise ConfigError(f"--connect {self.connect!r} must be a ws:// or wss:// address")
            if not _WORKER_ID.fullmatch(self.worker_id):
                raise ConfigError(f"worker id {self.worker_id!r} must be letters, digits, '.', '_' or '-' to dial out")
            _positive("redial_max_delay", self.redial_max_delay)
        if self.allow_coordinators and self.tls_ca is None:
            raise ConfigError("--allow-coordinator needs --tls-ca: identities come from client certificates")
        if not (math.isfinite(self.batch_delay) and self.batch_delay >= 0):
            raise ConfigError(f"batch delay must be a non-negative number of seconds, not {self.batch_delay!r}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"shard {self.shard[0] + 1}/{self.shard[1]} is not one of the {self.shard[1]} shards")
        if self.shard is not None and self.digits is not None:
            raise ConfigError("--shard and --digits each choose the worker's examples: give one of them")
        if self.attack is not None and self.attack not in ATTACKS:
            raise ConfigError(f"attack {self.attack!r} is not one of {', '.join(ATTACKS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")
        if self.min_group_size < 1:
            raise ConfigError(f"min group size must be at least 1, not {self.min_group_size}")
        _positive("dp_sgd_noise_multiplier", self.dp_sgd_noise_multiplier)
        _positive("dp_sgd_clip", self.dp_sgd_clip)
        if not (math.isfinite(self.dp_sgd_delta) and 0 < self.dp_sgd_delta < 1):
            raise ConfigError(f"dp_sgd_delta must be in (0, 1), not {self.dp_sgd_delta!r}")
        if self.dp_sgd_noise_multiplier is not None and self.testing:
            raise ConfigError("--dp-sgd is for training workers: the evaluator does not train")
        if not (math.isfinite(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise ConfigError(f"validation fraction must be in [0, 1), not {self.val_fraction!r}")
        if self.val_seed is not None and not 0 <= self.val_seed < 2**63:
            raise ConfigError(f"validation seed {self.val_seed} is not in 0..{2**63 - 1}")
        keys = [spec.key for spec in self.datasets]
        for key in keys:
            if keys.count(key) > 1:
                raise ConfigError(f"data set key {key!r} appears twice")
        self._check_own_data()

    def _check_own_data(self) -> None:
        """Own data replaces the bundled data sets' choices; the source options take the worker's group size."""
        if self.data is not None:
            if not self.data:
                raise ConfigError("data spec must not be empty")
            if self.dataset != "digits":
                raise ConfigError(
                    f"--data and --dataset {self.dataset} each choose the worker's data: give one of them"
                )
            if self.datasets:
                raise ConfigError(
                    "--data and --dataset-spec each choose the worker's data:"
                    " name own data in --dataset-spec as KEY=SPEC, e.g. north=csv:claims.csv"
                )
        if self.digits is not None and self.own_data:
            raise ConfigError(
                "--digits picks classes of digits or MNIST; a worker with its own data holds every example"
                " of it (use --shard K/N for a part)"
            )
        object.__setattr__(self, "source_options", replace(self.source_options, min_group_size=self.min_group_size))

    @property
    def own_data(self) -> bool:
        """Whether the worker holds a user's own data (``--data``, or a ``--dataset-spec`` of own data)."""
        return self.data is not None or any(spec.source is not None for spec in self.datasets)

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
    centralized: bool = False  # the one worker holds all the training data: the global model is "centralized"
    model: str | None = None  # None: the default model of the workers' data set
    training_rounds: int = 40
    federate_after_n_batches: int = 10
    batch_size: int = 32
    test_batch_size: int = 128
    lr: float = 0.1
    lr_decay: float = 0.98
    lr_min: float = 0.001
    seed: int = 1
    # The task (docs/tasks.md): auto, a built-in task or an import path; its loss (None: the task's default)
    task: str = "auto"
    loss: str | None = None
    class_weights: str | None = None  # "balanced", or None for unweighted cross-entropy
    threshold: float = 0.5  # binary: the positive probability above which an example is predicted positive
    huber_delta: float | None = None  # the huber loss's delta in standardised target units; None: 1
    target_units: str | None = None  # regression: the target's units, shown after MAE and RMSE ("days")
    # The local optimizer, sent in every training plan
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    local_epochs: int | None = None  # passes over each shard per round, instead of federate_after_n_batches
    keep_optimizer_state: bool = False  # keep each worker's optimizer state between rounds; default: reset
    # The shaped model (own data) and its start
    hidden: tuple[int, ...] = ()  # the mlp's hidden widths; empty: its default
    dropout: float = 0.0
    initial_weights: Path | None = None  # a safetensors file to start from instead of the seeded model
    allow_partial_weights: bool = False  # take the tensors of initial_weights that fit, listing the others
    # Strategy (see ``strategies``): a name or an import path, and its settings (mu, server_lr, ...)
    strategy: str = "fedavg"
    strategy_settings: dict[str, float] = field(default_factory=dict)
    # Client sampling: each round trains max(min_fit_workers, ceil(fraction_fit * workers)) of them
    fraction_fit: float = 1.0
    min_fit_workers: int = 1
    # Asynchronous mode (FedBuff, Nguyen et al. 2022): "sync" or "async"
    mode: str = "sync"
    buffer_size: int = 2  # updates per global version; 1 is FedAsync (Xie et al. 2019)
    staleness_weight: str = "polynomial"  # constant, polynomial or hinge
    staleness_a: float = 0.5
    staleness_b: int = 4
    max_staleness: int | None = None  # updates older than this many versions are discarded
    # Wire
    compress: str = "none"  # encoding of the workers' updates: none, fp16 or int8
    eval_every: int = 10
    score_updates: bool = True  # at an evaluation, also score each worker's update (the classic demo's lines)
    # Evaluation at the sites
    federated_eval: bool = False  # each evaluation round, every trainer scores the global model on its validation split
    cross_site_validation: bool = False  # after the last round: every local model and the global one on every site
    cross_site_out: Path | None = None  # where the matrix goes; None: beside metrics_out, else ./cross-site
    dataset_key: str | None = None  # the named data set every worker uses; None: each worker's default
    save_model: Path | None = None
    metrics_out: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    registry: Path | None = None  # record global versions here (SQLite + safetensors; syncfed.registry)
    registry_every_round: bool = False  # record every round, not only the evaluated ones and the final model
    # A user's own data (docs/data.md)
    normalize: str | None = None  # federated, fixed or none; None: the data kind's default
    # Reliability
    min_workers: int | None = None  # quorum; None: every training worker
    max_round_retries: int = 3
    # Limits
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE  # larger messages are streamed in fragments of this size
    receive_slots: int = DEFAULT_RECEIVE_SLOTS  # updates received at once (flow control); 0: no limit
    fold_fragments: bool = True  # fold a streamed update as it arrives (syncfed.absorption); False: decode it whole
    # Timeouts
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # evaluation replies
    statistics_timeout: float = DEFAULT_STATISTICS_TIMEOUT  # each federated-normalisation query (own data)
    round_timeout: float = DEFAULT_ROUND_TIMEOUT  # training replies
    ping_interval: float | None = DEFAULT_PING_INTERVAL  # None: no liveness pings
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT
    reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY
    # Dial-in workers (docs/protocol.md, "Dial-out workers"): those named NAME=dial-in connect to this address
    listen: str | None = None  # HOST:PORT
    worker_tokens: Path | None = None  # "ID TOKEN-FILE" lines: the token each dial-in worker must prove
    insecure_listen: bool = False  # let dial-in workers in unproven: local tests only
    max_pending_connections: int = 64  # dial-ins still authenticating; a newcomer evicts the oldest
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT  # a dial-in's TLS, HTTP upgrade and token
    # Security
    tls_ca: Path | None = None  # verify wss:// workers against this CA (the system's when None)
    tls_cert: Path | None = None  # client certificate for mutual TLS
    tls_key: Path | None = None
    auth_token_file: Path | None = None
    # Privacy (docs/privacy.md): secure aggregation and differential privacy
    secure_agg: bool = False  # the coordinator learns only the sum of each round's updates (Bonawitz et al. 2017)
    secagg_threshold: int | None = None  # t: survivors needed to unmask a sum; None: ceil(2n/3) of the round's n
    secagg_clip: float = 4.0  # without dp: update values beyond +-this are clipped before masking
    dp: str | None = None  # differential privacy (McMahan et al. 2018): None, "central" or "distributed"
    dp_clip: float = 1.0  # C: each worker's update is scaled down to this L2 norm
    dp_noise_multiplier: float | None = None  # z: noise std z * C on the sum; None: fitted to dp_target_epsilon
    dp_delta: float = 1e-5
    dp_target_epsilon: float | None = None  # stop before a round that would spend more

    def __post_init__(self) -> None:
        if not self.workers:
            raise ConfigError("at least one training worker is needed")
        if len(self.evaluator) > 1:
            raise ConfigError(f"at most one evaluator is supported, got {len(self.evaluator)}")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalization {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.centralized and len(self.workers) != 1:
            raise ConfigError(f"centralized training needs 1 training worker, not {len(self.workers)}")
        overlap = set(self.workers) & set(self.evaluator)
        if overlap:
            raise ConfigError(f"worker id {sorted(overlap)[0]!r} is both a trainer and the evaluator")
        for name in ("training_rounds", "batch_size", "test_batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.federate_after_n_batches < 0:  # 0: rounds of pure transfer, for benchmarks
            raise ConfigError(f"federate_after_n_batches must not be negative, not {self.federate_after_n_batches}")
        for name in ("federate_after_n_batches", "batch_size", "test_batch_size"):
            if getattr(self, name) > MAX_PLAN_SIZE:
                raise ConfigError(f"{name} {getattr(self, name)} exceeds limit of {MAX_PLAN_SIZE}")
        if self.save_model is not None and self.save_model.is_dir():
            raise ConfigError(f"--save-model {self.save_model} is a folder; name a file")
        if self.metrics_out is not None and self.metrics_out.is_dir():
            raise ConfigError(f"--metrics-out {self.metrics_out} is a folder; name a file")
        if self.cross_site_out is not None and self.cross_site_out.is_file():
            raise ConfigError(f"--cross-site-out {self.cross_site_out} is a file; name a folder")
        if self.dataset_key is not None:
            check_dataset_key(self.dataset_key)
        for name in (
            "lr",
            "lr_decay",
            "lr_min",
            "connect_timeout",
            "request_timeout",
            "statistics_timeout",
            "round_timeout",
            "ping_interval",
            "ping_timeout",
            "reconnect_max_delay",
        ):
            _positive(name, getattr(self, name))
        if self.lr_decay > MAX_LR_DECAY:
            raise ConfigError(f"lr_decay {self.lr_decay!r} exceeds limit of {MAX_LR_DECAY}: the rate decays or stays")
        if self.min_workers is not None and not 1 <= self.min_workers <= len(self.workers):
            raise ConfigError(
                f"min_workers {self.min_workers} is not between 1 and {len(self.workers)} training workers"
            )
        if self.max_round_retries < 0:
            raise ConfigError(f"max_round_retries must not be negative, not {self.max_round_retries}")
        if self.receive_slots < 0:
            raise ConfigError(f"receive_slots must not be negative, not {self.receive_slots}")
        _check_tls(self.tls_cert, self.tls_key)
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs --checkpoint-dir")
        strategy = make_strategy(self.strategy, **self.strategy_settings)  # raises ConfigError when invalid
        if not (0 < self.fraction_fit <= 1):
            raise ConfigError(f"fraction_fit must be in (0, 1], not {self.fraction_fit!r}")
        if not 1 <= self.min_fit_workers <= len(self.workers):
            raise ConfigError(
                f"min_fit_workers {self.min_fit_workers} is not between 1 and {len(self.workers)} training workers"
            )
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"mode {self.mode!r} is not one of sync, async")
        if self.mode == "async":
            if not strategy.streaming or strategy.uses_control:
                raise ConfigError(
                    f"--mode async applies buffered mean updates; strategy {self.strategy} needs every update of a"
                    " round (use fedavg, mean, fedprox, fedavgm, fedadam, fedyogi or fedadagrad)"
                )
            if self.fraction_fit != 1.0:
                raise ConfigError("--fraction-fit is for synchronous rounds; in --mode async every worker trains")
        if self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be at least 1, not {self.buffer_size}")
        staleness_weight(self.staleness_weight, 0, a=self.staleness_a, b=self.staleness_b)  # validates
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError(f"max_staleness must not be negative, not {self.max_staleness}")
        if self.compress not in COMPRESSIONS:
            raise ConfigError(f"compress {self.compress!r} is not one of {', '.join(COMPRESSIONS)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed {self.seed} is not in 0..{2**32 - 1}")
        if self.max_message_size < 1024:
            raise ConfigError(f"max message size {self.max_message_size} is below the minimum of 1024 bytes")
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise ConfigError(f"chunk size {self.chunk_size} is below the minimum of {MIN_CHUNK_SIZE} bytes")
        self._check_privacy(strategy.streaming and not strategy.uses_control)
        _check_listen(self)
        _check_task(self)
        _check_local_training(self)

    def _check_privacy(self, mean_only: bool) -> None:
        """Refuse what secure aggregation and differential privacy cannot do (``mean_only``: the strategy's needs)."""
        if self.dp not in (None, *DP_MODES):
            raise ConfigError(f"dp {self.dp!r} is not one of {', '.join(DP_MODES)}")
        if self.dp is None and (self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None):
            raise ConfigError("--dp-noise-multiplier and --dp-target-epsilon need --dp central or --dp distributed")
        if self.secagg_threshold is not None and not self.secure_agg:
            raise ConfigError("--secagg-threshold needs --secure-agg")
        if not self.private:
            return
        flag = "--secure-agg" if self.secure_agg else f"--dp {self.dp}"
        if not mean_only:
            raise ConfigError(
                f"{flag} works on the mean of the updates only; strategy {self.strategy} needs more"
                " (use fedavg, mean, fedprox, fedavgm, fedadam, fedyogi or fedadagrad)"
            )
        if self.mode != "sync":
            raise ConfigError(f"{flag} runs synchronous rounds only, not --mode {self.mode}")
        if self.cross_site_validation:
            raise ConfigError(f"--cross-site-validation scores each worker's own model, which {flag} keeps private")
        if self.compress != "none":
            raise ConfigError(f"--compress {self.compress} would change the updates {flag} protects; leave it out")
        per_round = self.sample_size(len(self.workers))
        if self.secure_agg:
            if per_round < 2:
                raise ConfigError(f"--secure-agg needs at least 2 workers per round, not {per_round}")
            t = self.secagg_threshold
            if t is not None and not per_round / 2 < t <= per_round:
                raise ConfigError(
                    f"secagg threshold {t} must be more than half of, and at most, the {per_round} workers per round"
                )
            _positive("secagg_clip", self.secagg_clip)
        if self.dp is not None:
            _positive("dp_clip", self.dp_clip)
            _positive("dp_noise_multiplier", self.dp_noise_multiplier)
            _positive("dp_target_epsilon", self.dp_target_epsilon)
            if not (math.isfinite(self.dp_delta) and 0 < self.dp_delta < 1):
                raise ConfigError(f"dp_delta must be in (0, 1), not {self.dp_delta!r}")
            if self.dp_noise_multiplier is None and self.dp_target_epsilon is None:
                raise ConfigError(f"--dp {self.dp} needs --dp-noise-multiplier or --dp-target-epsilon")

    @property
    def private(self) -> bool:
        """Whether rounds run through secure aggregation or differential privacy (``coordinator.private_rounds``)."""
        return self.secure_agg or self.dp is not None

    @property
    def step(self) -> str:
        """What the console calls one update of the global model: a round, or in asynchronous mode a version."""
        return "version" if self.mode == "async" else "round"

    @property
    def dp_sampling_rate(self) -> float:
        """The chance a worker takes part in a round, for the privacy accountant: the share client sampling picks."""
        return self.sample_size(len(self.workers)) / len(self.workers)

    @property
    def dial_in(self) -> tuple[str, ...]:
        """The workers (and evaluator) that connect to ``listen`` rather than being connected to."""
        return tuple(name for name, uri in {**self.workers, **self.evaluator}.items() if uri == DIAL_IN)

    @property
    def quorum(self) -> int:
        """How many training workers must contribute for a round to count (at most the round's sample)."""
        return len(self.workers) if self.min_workers is None else self.min_workers

    def sample_size(self, available: int) -> int:
        """How many of ``available`` workers a synchronous round trains."""
        wanted = max(self.min_fit_workers, math.ceil(self.fraction_fit * len(self.workers)))
        return min(wanted, available)

    def learning_rate(self, round_number: int) -> float:
        """``lr`` decayed by ``lr_decay`` each round, never below ``lr_min`` (nor above ``lr``).

        Finite and positive for every round: ``lr_decay`` is at most 1, so the
        power only shrinks, and an underflow to 0 meets the floor. A floor
        above ``lr`` would raise the rate, so it is capped at ``lr``.
        """
        decayed = self.lr * self.lr_decay ** max(round_number - 1, 0)
        return max(decayed, min(self.lr_min, self.lr))

    def is_eval_round(self, round_number: int) -> bool:
        """Rounds 1, 1 + eval_every, 1 + 2 * eval_every, ... and the last."""
        return (round_number - 1) % self.eval_every == 0 or round_number == self.training_rounds


def _check_listen(config: CoordinatorConfig) -> None:
    """Dial-in workers need an address to dial, and, unless told otherwise, a way to prove who they are."""
    if config.listen is None:
        if config.dial_in:
            raise ConfigError(f"worker {config.dial_in[0]} dials in: add --listen HOST:PORT")
        return
    parse_listen(config.listen)
    if not config.dial_in:
        raise ConfigError("--listen needs a worker that dials in, named as NAME=dial-in in --workers or --evaluator")
    if config.worker_tokens is None and config.tls_ca is None and not config.insecure_listen:
        raise ConfigError(
            "--listen lets in only workers that prove their id: add --worker-tokens FILE, or --tls-ca with"
            " --tls-cert and --tls-key for client certificates (--insecure-listen: local tests only)"
        )
    if config.tls_ca is not None and config.tls_cert is None:
        raise ConfigError("--tls-ca with --listen needs --tls-cert and --tls-key: the listener serves wss://")
    if config.max_pending_connections < 1:
        raise ConfigError(f"max pending connections {config.max_pending_connections} is below the minimum of 1")
    _positive("handshake_timeout", config.handshake_timeout)


def _check_task(config: CoordinatorConfig) -> None:
    """The task's flags agree with each other; what depends on the data is checked at the handshake."""
    task, builtin = config.task, config.task in TASK_KINDS
    if task not in TASKS and not _is_task_path(task):
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)} or an import path mypkg.tasks:Task")
    if config.loss is not None:
        owners = [kind for kind, losses in LOSSES.items() if config.loss in losses]
        if builtin and task not in owners:
            wanted = f"--task {owners[0]}" if owners else f"one of {', '.join(LOSSES[task])}"
            raise ConfigError(f"--loss {config.loss} goes with {wanted}, not --task {task}")
        if task == "auto" and not owners:
            known = sorted({loss for losses in LOSSES.values() for loss in losses})
            raise ConfigError(f"loss {config.loss!r} is not one of {', '.join(known)}")
    if config.class_weights is not None:
        if config.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"class weights {config.class_weights!r} are not one of {', '.join(CLASS_WEIGHTS)}")
        if task in ("binary", "regression") or (config.loss is not None and config.loss != "cross_entropy"):
            what = f"--task {task}" if task in ("binary", "regression") else f"--loss {config.loss}"
            raise ConfigError(f"--class-weights goes with a classification task, not {what}")
    if not (math.isfinite(config.threshold) and 0 < config.threshold < 1):
        raise ConfigError(f"threshold must be strictly between 0 and 1, not {config.threshold!r}")
    if config.threshold != 0.5 and task in ("classification", "regression"):
        raise ConfigError(f"--threshold goes with a binary task, not --task {task}")
    if config.huber_delta is not None:
        if not (math.isfinite(config.huber_delta) and 0 < config.huber_delta <= MAX_HUBER_DELTA):
            raise ConfigError(
                f"huber_delta must be above 0 and at most {MAX_HUBER_DELTA:g}, not {config.huber_delta!r}"
            )
        if config.loss != "huber":
            raise ConfigError(f"--huber-delta goes with --loss huber, not {_named_loss(config.loss)}")
    if config.target_units is not None:
        units = config.target_units
        if not (0 < len(units) <= MAX_UNITS and units.isprintable() and units == units.strip()):
            raise ConfigError(f"target units {units!r:.60} must be 1 to {MAX_UNITS} printable characters")
        if task in ("classification", "binary"):
            raise ConfigError(f"--target-units goes with a regression task, not --task {task}")
    if len(config.hidden) > MAX_HIDDEN or not all(0 < width <= MAX_WIDTH for width in config.hidden):
        raise ConfigError(
            f"hidden must be at most {MAX_HIDDEN} layer widths from 1 to {MAX_WIDTH}, not {config.hidden}"
        )
    if not (math.isfinite(config.dropout) and 0 <= config.dropout < 1):
        raise ConfigError(f"dropout must be from 0 to below 1, not {config.dropout!r}")
    if config.initial_weights is not None:
        if config.resume:
            raise ConfigError(
                "--initial-weights starts a new run, --resume continues a checkpointed one: give one of them"
            )
        if not config.initial_weights.is_file():
            raise ConfigError(f"--initial-weights {config.initial_weights}: no such file")
    elif config.allow_partial_weights:
        raise ConfigError("--allow-partial-weights needs --initial-weights")


def _named_loss(loss: str | None) -> str:
    return "the task's default loss" if loss is None else f"--loss {loss}"


def _check_local_training(config: CoordinatorConfig) -> None:
    """The local optimizer's settings, bounded as the training plan bounds them, and none the optimizer ignores."""
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(config.momentum) and 0 <= config.momentum < 1):
        raise ConfigError(f"momentum must be from 0 to below 1, not {config.momentum!r}")
    if config.momentum and config.optimizer != "sgd":
        raise ConfigError(f"--momentum goes with --optimizer sgd, not {config.optimizer}")
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay <= MAX_WEIGHT_DECAY):
        raise ConfigError(f"weight_decay must be from 0 to {MAX_WEIGHT_DECAY}, not {config.weight_decay!r}")
    _positive("grad_clip", config.grad_clip)
    if config.local_epochs is not None and not 1 <= config.local_epochs <= MAX_LOCAL_EPOCHS:
        raise ConfigError(f"local_epochs must be from 1 to {MAX_LOCAL_EPOCHS}, not {config.local_epochs}")
