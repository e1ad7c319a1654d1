"""``run_websocket_client.py`` (``syncfed-coordinator``): the coordinator of a federated training run.

Usage::

    python run_websocket_client.py                   # workers already running
    python run_websocket_client.py --spawn-workers   # start them locally, run, stop them
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from ..compression import COMPRESSIONS
from ..config import (
    CLASS_WEIGHTS,
    DEFAULT_EVALUATOR,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RECEIVE_SLOTS,
    DEFAULT_RECONNECT_MAX_DELAY,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_ROUND_TIMEOUT,
    DEFAULT_STATISTICS_TIMEOUT,
    DEFAULT_WORKERS,
    DP_MODES,
    TASKS,
    CoordinatorConfig,
    parse_endpoints,
)
from ..coordinator import Coordinator, RunResult
from ..data.normalization import NORMALIZATIONS
from ..datasets import DATASETS, ensure_mnist
from ..evaluation import headline, is_regression
from ..exceptions import ConfigError, SyncfedError
from ..models import DEMO_MODELS
from ..monitor import Progress, TensorBoardWriter
from ..net.spawn import spawn_workers
from ..partition import DEFAULT_CLASSES
from ..protocol import DEFAULT_CHUNK_SIZE, LOSSES, OPTIMIZERS
from ..shaped_models import SHAPED_MODELS
from ..strategies import STRATEGIES
from ..training import training_device
from .allocator import keep_freed_memory
from .common import (
    INTERRUPTED,
    TERMINATED,
    FromFlags,
    Parser,
    Terminated,
    add_client_security_flags,
    add_connection_limits,
    add_listen_flags,
    add_secure_agg_flags,
    config_from_flags,
    fail,
    parse_arguments,
    run_program,
    run_terminable,
    setup_logging,
    size,
    stdout_closed,
)
from .status import print_status

__all__ = ["PROGRAM", "build_parser", "config_from_args", "main"]

PROGRAM = "run_websocket_client.py"
CENTRAL = "central"

#: Strategy settings as flags: flag -> (setting, type, help). Only the flags given reach the strategy,
#: which refuses those it does not take.
STRATEGY_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--mu": ("mu", float, "fedprox: weight of the proximal term (default 0.01)"),
    "--server-lr": ("server_lr", float, "fedavgm, fedadam, fedyogi, fedadagrad, scaffold: server learning rate"),
    "--server-momentum": ("momentum", float, "fedavgm: server momentum (default 0.9)"),
    "--beta1": ("beta1", float, "fedadam, fedyogi, fedadagrad: first-moment decay (default 0.9)"),
    "--beta2": ("beta2", float, "fedadam, fedyogi: second-moment decay (default 0.99)"),
    "--tau": ("tau", float, "fedadam, fedyogi, fedadagrad: adaptivity (default 0.001)"),
    "--trim-ratio": ("trim_ratio", float, "trimmed-mean: share trimmed at each end per coordinate (default 0.2)"),
    "--byzantine-f": ("byzantine_f", int, "krum, multi-krum: byzantine workers tolerated (default 1)"),
    "--multi-krum-m": ("m", int, "multi-krum: updates averaged (default: n - f)"),
}

T = TypeVar("T")
Listener = Callable[[Mapping[str, Any]], None]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        # The full list is 60 lines: the usage names the common start and the groups below hold the rest.
        usage="%(prog)s [--spawn-workers | --workers ID=URI,... --evaluator ID=URI | --site NAME=DATA ...]"
        " [option ...]",
        description="Run federated training over syncfed workers. Flags may be written with dashes or underscores.",
    )
    # The flags the README's first sections use, on top of --help; the rest follow, grouped by topic.
    common = parser.add_argument_group("common options")
    recipe = parser.add_argument_group("training")
    recipe.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    recipe.add_argument("--test-batch-size", type=int, default=128, help="evaluation batch size (default: %(default)s)")
    common.add_argument("--training-rounds", type=int, default=40, help="federated rounds (default: %(default)s)")
    recipe.add_argument(
        "--federate-after-n-batches",
        type=int,
        help="local batches per round (default: 10, unless --local-epochs gives passes over each shard instead)",
    )
    recipe.add_argument("--lr", type=float, default=0.1, help="learning rate (default: %(default)s)")
    recipe.add_argument(
        "--lr-decay", type=float, default=0.98, help="learning-rate decay per round, floor 0.001 (default: %(default)s)"
    )
    recipe.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the initial model and the workers' shuffling (default: %(default)s)",
    )
    _add_task_flags(parser)
    strategy = parser.add_argument_group("strategy (docs/strategies.md)")
    strategy.add_argument(
        "--strategy",
        "--aggregation",
        dest="strategy",
        default="fedavg",
        metavar="NAME",
        help=f"{', '.join(STRATEGIES)}, or an import path mypkg.mod:MyStrategy (default: %(default)s)",
    )
    for flag, (setting, kind, text) in STRATEGY_FLAGS.items():
        strategy.add_argument(flag, dest=f"setting_{setting}", type=kind, help=text)
    strategy.add_argument(
        "--fraction-fit",
        type=float,
        default=1.0,
        help="client sampling: share of the training workers each round trains, seeded (default: %(default)s)",
    )
    strategy.add_argument(
        "--min-fit-workers",
        type=int,
        default=1,
        help="client sampling: at least this many per round (default: %(default)s)",
    )
    asynchronous = parser.add_argument_group("asynchronous mode (FedBuff)")
    asynchronous.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="sync: rounds wait for the selected workers; async: workers train continuously and the coordinator"
        " publishes a new global version per buffer of updates (default: %(default)s)",
    )
    asynchronous.add_argument(
        "--buffer-size",
        type=int,
        default=2,
        metavar="K",
        help="updates per global version; 1 is FedAsync (default: %(default)s)",
    )
    asynchronous.add_argument(
        "--staleness-weight",
        choices=("constant", "polynomial", "hinge"),
        default="polynomial",
        help="discount of stale updates: 1, (1+s)^-a, or 1 up to b then 1/(a(s-b)+1) (default: %(default)s)",
    )
    asynchronous.add_argument("--staleness-a", type=float, default=0.5, help="the discount's a (default: %(default)s)")
    asynchronous.add_argument("--staleness-b", type=int, default=4, help="the hinge's b (default: %(default)s)")
    asynchronous.add_argument(
        "--max-staleness", type=int, help="discard updates more than this many versions old (default: keep all)"
    )
    common.add_argument(
        "--model",
        help="registry name (mnist-cnn, digits-cnn) or import path mypkg.models:Net"
        " (default: follows the workers' data set)",
    )
    recipe.add_argument(
        "--eval-every", type=int, default=10, help="evaluate at rounds 1, 1+N, ... and the last (default: %(default)s)"
    )
    recipe.add_argument(
        "--eval-global-only",
        dest="score_updates",
        action="store_false",
        help="at an evaluation, score the global model alone, not each worker's update too as the classic demo"
        " does: one evaluation instead of one per worker, and the updates fold as they arrive, not kept whole",
    )
    recipe.add_argument("--cuda", action="store_true", help="with --spawn-workers, let the workers train on the GPU")
    recipe.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        help="over the workers' own data: standardise with the global mean and standard deviation computed"
        " before round 1 (federated), keep images' [0, 1] scale (fixed), or leave values as read (none);"
        " default: federated (docs/data.md)",
    )

    workers = parser.add_argument_group("workers")
    common.add_argument(
        "--workers", default=DEFAULT_WORKERS, help="training workers as id=uri,... (default: %(default)s)"
    )
    common.add_argument(
        "--evaluator", default=DEFAULT_EVALUATOR, help="the evaluator as id=uri, empty for none (default: %(default)s)"
    )
    common.add_argument(
        "--spawn-workers",
        action="store_true",
        help="start the workers as local processes on free ports, and stop them at the end",
    )
    workers.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="with --spawn-workers: the workers' data set (default: %(default)s)",
    )
    workers.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="with --spawn-workers: where MNIST/raw lives (default: %(default)s)",
    )

    common.add_argument(
        "--worker-args",
        action="append",
        default=[],
        metavar="[NAME=]ARGS",
        help="with --spawn-workers: more flags for every training worker, as one shell-quoted string, e.g."
        " --worker-args='--val-fraction 0.2 --slowdown 0.1', or for worker NAME alone (the evaluator too), e.g."
        " --worker-args dave='--digits 0,5,9'; repeatable (see run_websocket_server.py --help)",
    )
    common.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=DATA [FLAGS]",
        help="spawn a local worker NAME over its own data DATA (a worker's --data: csv:PATH, images:DIR, ...),"
        " optionally followed by flags for that site alone, e.g. --site 'bob=csv:b.csv --label-column y';"
        " repeat per site; the site named as the evaluator (testing, unless --evaluator names another) holds"
        " the test data; implies --spawn-workers, and --worker-args go to every site, or NAME=ARGS to one"
        " (docs/data.md)",
    )
    workers.add_argument(
        "--centralized",
        action="store_true",
        help="with --spawn-workers: train one worker that holds all the training data (the pooled baseline)",
    )
    workers.add_argument(
        "--status", action="store_true", help="print who the workers are and how fast they answer, then exit"
    )

    sites = parser.add_argument_group("evaluation at the sites and named data sets (docs/evaluation.md)")
    sites.add_argument(
        "--federated-eval",
        action="store_true",
        help="at each evaluation round, every training worker also scores the global model on its validation"
        " split; printed per site and as the example-weighted average",
    )
    sites.add_argument(
        "--cross-site-validation",
        action="store_true",
        help="after the last round, score every worker's final local model and the global one on every"
        " worker's validation split and the evaluator's test set",
    )
    sites.add_argument(
        "--cross-site-out",
        type=Path,
        metavar="DIR",
        help="where the cross-site matrix goes as JSON and PNG (default: cross-site/ beside --metrics-out,"
        " else ./cross-site)",
    )
    sites.add_argument(
        "--dataset-key",
        metavar="NAME",
        help="train and evaluate on the workers' named data set NAME (see the workers' --dataset-spec);"
        " default: each worker's default data set",
    )

    output = parser.add_argument_group("output")
    common.add_argument("--save-model", type=Path, metavar="PATH", help="save the final federated model as safetensors")
    common.add_argument(
        "--metrics-out", type=Path, metavar="PATH", help="write one JSON object per round and per evaluated model"
    )
    output.add_argument("--tensorboard", type=Path, metavar="DIR", help="also write TensorBoard scalars to DIR")
    output.add_argument(
        "--registry",
        type=Path,
        metavar="DIR",
        help="record the evaluated rounds' and the final global model in this model registry"
        " (python -m syncfed models); default: registry/ beside --metrics-out when that is given",
    )
    output.add_argument("--no-registry", action="store_true", help="record no model versions")
    output.add_argument(
        "--registry-every-round", action="store_true", help="record every round's model in the registry"
    )
    output.add_argument(
        "--no-progress", action="store_true", help="plain lines per round instead of a progress bar on a terminal"
    )
    output.add_argument("--verbose", action="store_true", help="log rounds, requests and the spawned workers' output")

    common.add_argument("--config", type=Path, metavar="FILE", help="read settings from this TOML file (flags win)")
    add_client_security_flags(parser)
    add_listen_flags(parser)

    reliability = parser.add_argument_group("reliability")
    reliability.add_argument(
        "--round-timeout",
        type=float,
        default=DEFAULT_ROUND_TIMEOUT,
        help="seconds a round waits for training replies; later ones are dropped (default: %(default)s)",
    )
    reliability.add_argument(
        "--min-workers", type=int, help="quorum: training workers a round needs to count (default: all of them)"
    )
    reliability.add_argument(
        "--max-round-retries",
        type=int,
        default=3,
        help="retries of a round below the quorum before the run stops (default: %(default)s)",
    )
    reliability.add_argument(
        "--ping-interval",
        type=float,
        default=DEFAULT_PING_INTERVAL,
        help="seconds between liveness pings to each worker (default: %(default)s)",
    )
    reliability.add_argument(
        "--ping-timeout",
        type=float,
        default=DEFAULT_PING_TIMEOUT,
        help="a worker that misses pings this long is dropped as frozen or gone (default: %(default)s)",
    )
    reliability.add_argument(
        "--reconnect-max-delay",
        type=float,
        default=DEFAULT_RECONNECT_MAX_DELAY,
        help="cap of the exponential backoff between reconnection attempts (default: %(default)s)",
    )
    reliability.add_argument(
        "--checkpoint-dir", type=Path, metavar="DIR", help="write a checkpoint here after every completed round"
    )
    reliability.add_argument(
        "--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir with its next round"
    )

    limits = parser.add_argument_group("limits and timeouts")
    limits.add_argument(
        "--chunk-size",
        type=size,
        default=DEFAULT_CHUNK_SIZE,
        help="stream larger messages in fragments of this size, so no side holds a second copy (default: %(default)s)",
    )
    limits.add_argument(
        "--receive-slots",
        type=int,
        default=DEFAULT_RECEIVE_SLOTS,
        metavar="K",
        help="training updates received at once; finished workers hold theirs until a slot frees, which bounds"
        " the coordinator's memory however many workers there are (0: no limit; default: %(default)s)",
    )
    limits.add_argument(
        "--whole-updates",
        dest="fold_fragments",
        action="store_false",
        help="decode each training update whole before folding it in, rather than folding a streamed one as its"
        " fragments arrive; costs a model-sized buffer per receive slot, but a reply that breaks off midway never"
        " makes the round train again (docs/performance.md)",
    )
    limits.add_argument(
        "--compress",
        choices=COMPRESSIONS,
        default="none",
        help="encoding of the workers' updates on the wire; fp16 and int8 cut the bytes of slow links"
        " at a small error, reported in the metrics (default: %(default)s)",
    )
    add_connection_limits(limits)
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds to wait for an evaluation reply (default: %(default)s)",
    )
    limits.add_argument(
        "--statistics-timeout",
        type=float,
        default=DEFAULT_STATISTICS_TIMEOUT,
        help="seconds each site has to answer a federated-normalisation query over its own data, which reads"
        " all of it: an image folder once per channel, twice under --secure-agg (default: %(default)s)",
    )
    _add_privacy_flags(parser)
    return parser


def _widths(text: str) -> tuple[int, ...]:
    """``--hidden 64,32``: layer widths, comma-separated."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths, e.g. 64,32") from None


def _add_task_flags(parser: argparse.ArgumentParser) -> None:
    """The task, its loss and metrics, the local optimizer and the shaped model (docs/tasks.md)."""
    task = parser.add_argument_group("task, local optimizer and model (docs/tasks.md)")
    task.add_argument(
        "--task",
        default="auto",
        metavar="TASK",
        help=f"{', '.join(TASKS)}, or a task of the workers' operators, mypkg.tasks:Task (the workers are started"
        " with the same path); auto: regression for a continuous label, binary for 2 classes, else"
        " classification (default: %(default)s)",
    )
    losses = sorted({loss for names in LOSSES.values() for loss in names})
    task.add_argument(
        "--loss", metavar="LOSS", help=f"{', '.join(losses)} (default: the task's first: cross_entropy, bce, mse)"
    )
    task.add_argument(
        "--class-weights",
        choices=CLASS_WEIGHTS,
        help="classification: weigh class c by n / (C * n_c), from the federated label histogram",
    )
    task.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="binary: predict positive above this probability, for sensitivity and specificity (default: %(default)s)",
    )
    task.add_argument(
        "--huber-delta",
        type=float,
        metavar="DELTA",
        help="with --loss huber: the loss's delta, in standard deviations of the target (default: 1)",
    )
    task.add_argument(
        "--target-units",
        metavar="TEXT",
        help="regression: the target's units, shown after MAE and RMSE, e.g. days (default: the label's name)",
    )
    task.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="local optimizer (default: %(default)s)")
    task.add_argument("--momentum", type=float, default=0.0, help="sgd's momentum (default: %(default)s)")
    task.add_argument(
        "--weight-decay", type=float, default=0.0, help="L2 term, adamw's decoupled decay (default: %(default)s)"
    )
    task.add_argument("--grad-clip", type=float, metavar="NORM", help="clip each step's gradient to this L2 norm")
    task.add_argument(
        "--local-epochs",
        type=int,
        metavar="E",
        help="each round, E passes over each worker's shard instead of --federate-after-n-batches batches",
    )
    task.add_argument(
        "--keep-optimizer-state",
        action="store_true",
        help="keep each worker's optimizer state (momentum, Adam moments) between rounds; default: reset each round",
    )
    task.add_argument(
        "--hidden", type=_widths, default=(), metavar="W,W", help="the mlp's hidden layer widths (default: 64,32)"
    )
    task.add_argument("--dropout", type=float, default=0.0, help="the shaped model's dropout (default: %(default)s)")
    task.add_argument(
        "--initial-weights",
        type=Path,
        metavar="PATH",
        help="start from these safetensors weights (an earlier --save-model, ImageNet's resnet18), checked by"
        " name and shape",
    )
    task.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="with --initial-weights: take the tensors that fit, and list the others",
    )


def _add_privacy_flags(parser: argparse.ArgumentParser) -> None:
    """Secure aggregation and differential privacy (docs/privacy.md)."""
    privacy = parser.add_argument_group("privacy (docs/privacy.md)")
    add_secure_agg_flags(privacy, summed="each round's updates", among="those per round")
    privacy.add_argument(
        "--secagg-clip",
        type=float,
        default=4.0,
        metavar="R",
        help="without --dp, update values beyond +-R are clipped before masking (default: %(default)s)",
    )
    privacy.add_argument(
        "--dp",
        choices=DP_MODES,
        help="differential privacy (DP-FedAvg): the coordinator (central) or each worker (distributed) adds the noise",
    )
    privacy.add_argument(
        "--dp-clip",
        type=float,
        default=1.0,
        metavar="C",
        help="L2 norm each worker's update is clipped to (default: %(default)s)",
    )
    privacy.add_argument(
        "--dp-noise-multiplier",
        type=float,
        metavar="Z",
        help="noise of standard deviation Z * C on the sum of the updates (default: the least that lets"
        " --training-rounds rounds stay within --dp-target-epsilon)",
    )
    privacy.add_argument(
        "--dp-delta", type=float, default=1e-5, help="the delta epsilon is reported at (default: %(default)s)"
    )
    privacy.add_argument(
        "--dp-target-epsilon",
        type=float,
        metavar="EPSILON",
        help="stop, saving the model, before a round that would spend more than this",
    )


def _registry(args: argparse.Namespace) -> Path | None:
    """``--registry``, else ``registry/`` beside ``--metrics-out``; none with ``--no-registry``."""
    if args.no_registry:
        return None
    return args.registry or (args.metrics_out.parent / "registry" if args.metrics_out is not None else None)


def _batches(args: argparse.Namespace) -> int:
    """``--federate-after-n-batches``, 10 by default; refused beside ``--local-epochs``, which replaces it."""
    if args.federate_after_n_batches is not None and args.local_epochs is not None:
        raise ConfigError("--local-epochs and --federate-after-n-batches each size a round's training: give one")
    return 10 if args.federate_after_n_batches is None else int(args.federate_after_n_batches)


#: The special cases of :func:`config_from_args`: CoordinatorConfig fields that are not simply the flag of
#: their name. ``workers`` and ``evaluator`` come from the caller, which parses (or spawns) them.
CONFIG_FROM_FLAGS: Final[dict[str, FromFlags | None]] = {
    "lr_min": None,  # no flag: the default floor
    "strategy_settings": lambda args: {
        setting: getattr(args, f"setting_{setting}")
        for setting, _, _ in STRATEGY_FLAGS.values()
        if getattr(args, f"setting_{setting}") is not None
    },
    "registry": _registry,
    "federate_after_n_batches": _batches,
}


def config_from_args(args: argparse.Namespace, workers: dict[str, str], evaluator: dict[str, str]) -> CoordinatorConfig:
    """The run's config from the parsed flags; see :data:`CONFIG_FROM_FLAGS` for what is not one flag's value.

    Raises:
        ConfigError: if the settings do not make a valid run.
    """
    return config_from_flags(CoordinatorConfig, args, CONFIG_FROM_FLAGS, workers=workers, evaluator=evaluator)


#: Worker flags that --spawn-workers sets itself, from the client's own flags or per process.
SPAWNER_FLAGS: Final = ("--id", "--host", "--port", "--testing", "--dataset", "--data-dir", "--data", "--config")


def _worker_args(text: str | None, what: str = "--worker-args") -> list[str]:
    """Worker flags (``--worker-args``, or a ``--site``'s own) split as a shell would.

    Raises:
        ConfigError: if it cannot be split, or sets a flag the spawner sets.
    """
    try:
        tokens = shlex.split(text or "")
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r}: {exc}") from None
    for token in tokens:
        if _flag(token) in SPAWNER_FLAGS:
            raise ConfigError(f"{what} cannot set {_flag(token)}: --spawn-workers sets it for each worker")
    return tokens


def _flag(token: str) -> str:
    """``--digits_x=1`` -> ``--digits-x``: the flag a worker's argument names, as the worker reads it."""
    return token.split("=", 1)[0].replace("_", "-")


def parse_worker_args(entries: Sequence[str], spawned: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--worker-args`` entries as the flags for every spawned training worker and ``{name: its own flags}``.

    An entry that starts with a flag is for every training worker; ``NAME=ARGS``
    for the spawned worker NAME alone, whose own flags come last and so win.

    Raises:
        ConfigError: if an entry cannot be split, sets a flag the spawner sets, or names no spawned worker.
    """
    every: list[str] = []
    own: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, rest = entry.partition("=")
        if not sep or entry.lstrip().startswith("-"):
            every += _worker_args(entry)
            continue
        name = name.strip()
        if name not in spawned:
            raise ConfigError(f"--worker-args {entry!r} names {name!r}, not a spawned worker ({', '.join(spawned)})")
        own.setdefault(name, []).extend(_worker_args(rest, f"--worker-args {name}"))
    return every, own


def _check_classes(name: str, arguments: Sequence[str]) -> None:
    """A spawned training worker whose id has no default digits must be given some, before any process starts.

    Raises:
        ConfigError: naming the per-worker form that gives them.
    """
    if name not in DEFAULT_CLASSES and not {"--digits", "--shard"} & {_flag(token) for token in arguments}:
        raise ConfigError(
            f"worker id {name!r} has no default digits (only {', '.join(DEFAULT_CLASSES)} do): give them with"
            f" --worker-args {name}='--digits 0,5,9' (or --shard K/N)"
        )


def parse_sites(entries: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """``--site NAME=DATA [FLAGS]`` entries as ``{name: (data spec, that site's own worker flags)}``, in order.

    The flags after the data, shell-quoted like ``--worker-args``, go to that
    site alone: ``--site "bob=csv:b.csv --categorical-columns dose"``.

    Raises:
        ConfigError: if an entry lacks a name or data, a name repeats, or its flags set one the spawner sets.
    """
    sites: dict[str, tuple[str, list[str]]] = {}
    for entry in entries:
        name, sep, rest = entry.partition("=")
        words = _worker_args(rest, f"--site {name.strip()}") if sep else []
        if not sep or not name.strip() or not words or words[0].startswith("-"):
            raise ConfigError(f"--site {entry!r} must look like alice=csv:alice.csv (NAME=DATA, then its own flags)")
        if name.strip() in sites:
            raise ConfigError(f"--site {name.strip()!r} appears twice")
        sites[name.strip()] = (words[0], words[1:])
    return sites


def _endpoints(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The training workers and the evaluator as ``{id: uri}``; spawned ``--site`` and ``--centralized`` workers
    have no uri yet."""
    evaluator = parse_endpoints(args.evaluator, dial_in=True)
    if args.centralized:
        return {CENTRAL: ""}, evaluator
    sites = parse_sites(args.site)
    if not sites:
        return parse_endpoints(args.workers, dial_in=True), evaluator
    tester = next(iter(evaluator), None)
    return {name: "" for name in sites if name != tester}, {name: "" for name in sites if name == tester}


async def _with_workers(
    args: argparse.Namespace, action: Callable[[dict[str, str], dict[str, str]], Awaitable[T]]
) -> T:
    """Run ``action(workers, evaluator)`` on the configured workers, or on spawned ones."""
    workers, evaluator = _endpoints(args)
    if args.site:
        return await _with_sites(args, workers, evaluator, action)
    if args.centralized and not args.spawn_workers:
        raise ConfigError(
            "--centralized trains one spawned worker that holds all the training data: add --spawn-workers"
        )
    if not args.spawn_workers:
        if args.worker_args:
            raise ConfigError("--worker-args only applies with --spawn-workers")
        return await action(workers, evaluator)
    extra, own = parse_worker_args(args.worker_args, [*workers, *evaluator])
    common = ["--dataset", args.dataset, "--data-dir", str(args.data_dir), "--threads", "1", *_cuda_flag(args)]
    if args.model and args.model not in DEMO_MODELS:  # a user model, or a benchmark model: workers serve it only so
        common += ["--model", args.model]
    plan = [
        (name, [*common, *(["--digits", "0-9"] if name == CENTRAL else []), *extra, *own.get(name, [])])
        for name in workers
    ]
    for name, arguments in plan:
        _check_classes(name, arguments)
    plan += [(name, [*common, "--testing", *own.get(name, [])]) for name in evaluator]
    if args.dataset == "mnist":
        ensure_mnist(args.data_dir)  # once, rather than four workers downloading at the same time
    async with spawn_workers(plan) as processes:
        spawned = {name: processes[name].uri for name in workers}
        spawned_evaluator = {name: processes[name].uri for name in evaluator}
        return await action(spawned, spawned_evaluator)


def _cuda_flag(args: argparse.Namespace) -> list[str]:
    """``--cuda`` for the spawned workers, checked here first: they run on this machine, and would each stop.

    Raises:
        ConfigError: if ``--cuda`` is given and torch sees no GPU here.
    """
    if not args.cuda:
        return []
    training_device(True)
    return ["--cuda"]


async def _with_sites(
    args: argparse.Namespace,
    workers: dict[str, str],
    evaluator: dict[str, str],
    action: Callable[[dict[str, str], dict[str, str]], Awaitable[T]],
) -> T:
    """Spawn one worker per ``--site`` over its own data, with ``--worker-args`` and its own flags; run ``action``."""
    if args.centralized:
        raise ConfigError("--centralized pools the bundled data set; it does not apply to --site")
    sites = parse_sites(args.site)
    extra, named = parse_worker_args(args.worker_args, list(sites))
    for name, words in named.items():
        sites[name][1].extend(words)  # after the site's own flags: NAME=ARGS wins
    common = ["--threads", "1", *_cuda_flag(args)]
    if args.model and args.model not in DEMO_MODELS and args.model not in SHAPED_MODELS:  # sites serve mlp and cnn
        common += ["--model", args.model]
    plan = [
        (name, ["--data", spec, *common, *(["--testing"] if name in evaluator else []), *extra, *own])
        for name, (spec, own) in sites.items()
    ]
    async with spawn_workers(plan) as processes:
        spawned = {name: processes[name].uri for name in workers}
        spawned_evaluator = {name: processes[name].uri for name in evaluator}
        return await action(spawned, spawned_evaluator)


async def _train(args: argparse.Namespace, progress: Progress, listeners: list[Listener]) -> RunResult:
    async def action(workers: dict[str, str], evaluator: dict[str, str]) -> RunResult:
        config = config_from_args(args, workers, evaluator)
        return await Coordinator(config, report=progress.report, listeners=listeners).run()

    # Check the settings before starting any worker process.
    config_from_args(args, *_endpoints(args))
    return await _with_workers(args, action)


async def _status(args: argparse.Namespace) -> int:
    async def action(workers: dict[str, str], evaluator: dict[str, str]) -> int:
        return await print_status({**workers, **evaluator}, args)

    return await _with_workers(args, action)


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line."""
    return run_program(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_arguments(build_parser(), sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return fail(PROGRAM, exc)
    setup_logging(args.verbose, default=30)
    keep_freed_memory()  # before any thread: each round's model-sized buffers reuse the last round's pages
    unit = "version" if args.mode == "async" else "round"
    progress = Progress(args.training_rounds, enabled=not args.no_progress and not args.status, unit=unit)
    listeners: list[Listener] = [progress]
    tensorboard: TensorBoardWriter | None = None
    try:
        if args.status:
            return run_terminable(lambda: _status(args))
        if args.tensorboard is not None:
            tensorboard = TensorBoardWriter(args.tensorboard)
            listeners.append(tensorboard)
        result = run_terminable(lambda: _train(args, progress, listeners))
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Terminated:  # by SIGTERM, after the spawned workers were stopped
        print(f"{PROGRAM}: terminated", file=sys.stderr)
        return TERMINATED
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except BrokenPipeError:
        return stdout_closed()
    except OSError as exc:  # an output path that cannot be written, say
        print(f"{PROGRAM}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    finally:
        progress.close()
        if tensorboard is not None:
            tensorboard.close()
    final = [record for record in result.evaluations if record.model == result.global_model]
    if final:
        last = final[-1]
        figures = headline(last.result, result.readout)
        if is_regression(last.result) or (figures and result.readout.user is not None):
            print(f"Final {result.global_model} model at {unit} {last.round}: {figures}")
        else:
            print(f"Final {result.global_model} accuracy at {unit} {last.round}: {last.result.accuracy:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
