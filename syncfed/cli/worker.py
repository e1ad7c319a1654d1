"""``run_websocket_server.py`` (``syncfed-worker``): start a worker that serves its private shard.

Usage::

    python run_websocket_server.py --id alice --port 8777
    python run_websocket_server.py --id testing --port 8780 --testing
    python run_websocket_server.py --id north --port 8781 --data npz:north.npz  # own data (docs/data.md)
    python run_websocket_server.py --id alice --connect wss://coordinator:8765 --auth-token-file alice.token  # dial out
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from functools import partial
from pathlib import Path
from typing import Final

import numpy as np

from ..config import (
    ATTACKS,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PREPARED_BYTES,
    WorkerConfig,
)
from ..data.base import LABEL_TYPES, MISSING_POLICIES, SourceOptions
from ..datasets import DATASETS, parse_dataset_spec
from ..exceptions import ConfigError, SyncfedError
from ..partition import group_label, parse_classes, parse_shard
from ..policy import load_policy
from ..protocol import DEFAULT_CHUNK_SIZE
from ..worker.cores import available_cores, count_workers, counted, fair_threads, registered
from ..worker.holdings import Holding, SourceHolding, load_holdings
from .allocator import keep_freed_memory
from .common import (
    INTERRUPTED,
    FromFlags,
    Parser,
    config_from_flags,
    fail,
    parse_arguments,
    run_program,
    setup_logging,
    size,
    stdout_closed,
    until_input_ends,
)

__all__ = ["PROGRAM", "build_parser", "config_from_args", "main"]

PROGRAM = "run_websocket_server.py"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        description="Run a syncfed worker that trains and evaluates on its private data. "
        "Flags may be written with dashes or underscores.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="read settings from this TOML file (flags win)")
    parser.add_argument("--id", help="worker id, e.g. alice, bob, charlie or testing (required)")
    parser.add_argument("--host", default="localhost", help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8777, help="port to bind, 0 for a free one (default: %(default)s)")
    parser.add_argument(
        "--connect",
        metavar="URI",
        help="dial out to a coordinator's --listen address (ws:// or wss://) instead of listening: for sites that"
        " open no inbound port; dials again with backoff for as long as it runs (--host and --port unused)",
    )
    parser.add_argument(
        "--redial-max-delay",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --connect: cap of the jittered backoff between attempts (default: %(default)s)",
    )
    parser.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="stop when standard input ends: a parent that starts the worker with a pipe as its input"
        " (--spawn-workers does) takes it down with it, even when the parent is killed",
    )
    parser.add_argument(
        "--testing", action="store_true", help="hold the test set and serve as the evaluator (implied by --id testing)"
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="data set (default: %(default)s)")
    data.add_argument(
        "--data",
        metavar="SPEC",
        help="serve your own data instead: images:DIR, csv:PATH, tsv:PATH, parquet:PATH, npz:PATH or"
        " module.path:function (docs/data.md)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where MNIST/raw lives (default: %(default)s)"
    )
    parser.add_argument(
        "--digits",
        help="classes this worker holds, e.g. 0,5,9 or 0-3"
        " (default: by id: alice 0-3, bob 4-6, charlie 7-9; all for the evaluator)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="hold the K-th of N seeded IID shards of the training set instead of whole classes, e.g. 2/4",
    )
    parser.add_argument(
        "--shard-seed", type=int, default=0, help="seed of the IID shuffle; the same on every worker (default: 0)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of a training worker's examples held out for validation and never trained on"
        " (default: %(default)s; 0 for none)",
    )
    parser.add_argument(
        "--val-seed", type=int, metavar="N", help="seed of the validation hold-out (default: derived from --id)"
    )
    parser.add_argument(
        "--dataset-spec",
        action="append",
        default=[],
        metavar="KEY=DATASET:SPLIT",
        help="hold this named data set, e.g. digits-train=digits:train, or own data such as north=csv:claims.csv"
        " (repeatable; the first is the default; --shard and the own-data flags apply to each, --digits to the bundled"
        " ones); without it the worker holds --dataset or --data",
    )
    own = parser.add_argument_group("own data (--data; docs/data.md)")
    own.add_argument(
        "--image-size", type=_image_size, metavar="N|H,W", help="resize every image to N x N or H x W pixels"
    )
    own.add_argument("--channels", type=int, choices=(1, 3), help="convert every image to 1 (grayscale) or 3 (RGB)")
    own.add_argument("--label-column", metavar="NAME", help="a table's label column")
    own.add_argument(
        "--feature-columns", type=_names, metavar="A,B,C", help="a table's feature columns (default: every other)"
    )
    own.add_argument(
        "--categorical-columns",
        type=_names,
        default=(),
        metavar="A,B",
        help="feature columns one-hot encoded over a vocabulary the workers agree on",
    )
    own.add_argument(
        "--missing",
        choices=MISSING_POLICIES,
        default="error",
        help="what a table's missing value does: stop naming its row and column, take the column's mean, or drop"
        " the row (default: %(default)s)",
    )
    own.add_argument(
        "--label-type",
        choices=LABEL_TYPES,
        default="auto",
        help="read the label as classes or as a continuous number; auto: continuous when its values are"
        " non-integral numbers (default: %(default)s)",
    )
    own.add_argument(
        "--data-arg",
        action="append",
        default=[],
        type=_data_arg,
        metavar="KEY=VALUE",
        help="a setting for a module.path:function loader (repeatable)",
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="MODULE:ATTR", help="also allow this user model (repeatable)"
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="also allow this user task (mypkg.tasks:Task), which a coordinator's --task may then name (repeatable)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="save the optimizer state kept between rounds (--keep-optimizer-state) here, so a restarted worker"
        " goes on with it (default: kept in memory only)",
    )
    parser.add_argument(
        "--bench-models",
        action="store_true",
        help="also serve the benchmark models mlp-1m, mlp-10m and mlp-100m (scripts/bench.py)",
    )
    parser.add_argument(
        "--cuda", action="store_true", help="train on the GPU (the worker stops at start if torch sees none)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: this worker's share of the cores among the syncfed workers running on"
        " this machine, max(1, cores // workers), re-counted before each job and never above torch's own default)",
    )
    parser.add_argument("--no-download", action="store_true", help="never download MNIST")
    parser.add_argument(
        "--max-message-size",
        type=size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest message accepted, in bytes or with a unit such as 512MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=size,
        default=DEFAULT_CHUNK_SIZE,
        help="stream larger replies in fragments of this size (default: %(default)s)",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=8, help="concurrent requests per connection (default: %(default)s)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="concurrent authenticated connections; more are refused with HTTP 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-pending-connections",
        type=int,
        default=64,
        metavar="N",
        help="connections still authenticating (token, client certificate, or hello without either), counted apart"
        " from --max-connections; a newcomer beyond N closes the oldest of them (default: %(default)s)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="time a new connection has for the TLS handshake, the websocket upgrade and then the token"
        " challenge (or, without a token or client certificates, its hello) (default: %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that sends no request (pings do not count) for this long while nothing is in"
        " flight or held for it; keep it above the coordinator's round timeout plus its evaluation time"
        " (default: %(default)s; 0 for never)",
    )
    parser.add_argument(
        "--max-secagg-clients",
        type=int,
        default=1024,
        help="largest secure aggregation round joined, in clients; larger ones are refused (default: %(default)s)",
    )
    parser.add_argument(
        "--max-prepared-bytes",
        type=size,
        default=DEFAULT_MAX_PREPARED_BYTES,
        help="largest table encoded as the federation's plan says (a float32 per example and one-hot slot),"
        " in bytes or with a unit such as 512MiB; a plan asking more is refused (default: %(default)s)",
    )
    parser.add_argument(
        "--min-group-size",
        type=int,
        default=10,
        metavar="N",
        help="refuse analytics queries whose answer would describe fewer than N examples (default: %(default)s)",
    )
    privacy = parser.add_argument_group("example-level differential privacy (docs/privacy.md)")
    privacy.add_argument(
        "--dp-sgd",
        type=float,
        metavar="NOISE_MULTIPLIER",
        help="train with DP-SGD through Opacus (Abadi et al. 2016): clip each example's gradient and add"
        " Gaussian noise of this multiplier times the clip to each batch's sum; needs pip install 'syncfed[dpsgd]'",
    )
    privacy.add_argument(
        "--dp-sgd-clip",
        type=float,
        default=1.0,
        metavar="C",
        help="L2 norm each example's gradient is scaled down to under --dp-sgd (default: %(default)s)",
    )
    privacy.add_argument(
        "--dp-sgd-delta",
        type=float,
        default=1e-5,
        metavar="DELTA",
        help="delta at which the worker reports the epsilon its --dp-sgd steps spent (default: %(default)s)",
    )
    privacy.add_argument(
        "--withhold-histogram",
        action="store_true",
        help="tell coordinators neither how many examples of each class this worker holds nor how many in all,"
        " only a power of two at least that many (for --secure-agg runs; docs/privacy.md)",
    )
    hooks = parser.add_argument_group("test hooks (for drills and tests only, never in production)")
    hooks.add_argument(
        "--slowdown",
        "--batch-delay",
        dest="batch_delay",
        type=float,
        default=0.0,
        metavar="SECONDS_PER_BATCH",
        help="TEST HOOK: sleep this long per training batch, to simulate a slow site (default: %(default)s)",
    )
    hooks.add_argument(
        "--attack",
        choices=ATTACKS,
        help="TEST HOOK, NEVER IN PRODUCTION: act as a byzantine worker that "
        + "; ".join(f"{name} {what}" for name, what in ATTACKS.items()),
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve wss:// with this certificate")
    security.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private key")
    security.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="require coordinators to present a certificate this CA signed (with --connect: verify the coordinator's)",
    )
    security.add_argument(
        "--allow-coordinator",
        action="append",
        default=[],
        metavar="NAME",
        help="let in only coordinators whose certificate has this common name (repeatable)",
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="require coordinators to prove they know this token (with --connect: prove this worker's id with it)",
    )
    security.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help='serve only jobs this site policy allows (TOML; docs/security.md, "Site policies")',
    )
    parser.add_argument("--verbose", action="store_true", help="log every message")
    return parser


def _image_size(text: str) -> tuple[int, int]:
    """``224`` or ``224,160`` (height, width) for argparse."""
    parts = text.split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 224 or 224,160 (height,width)")
    return (sizes[0], sizes[-1])


def _names(text: str) -> tuple[str, ...]:
    """``a,b,c`` as column names for argparse."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of column names such as age,sex")
    return names


def _data_arg(text: str) -> tuple[str, str]:
    """``key=value`` for argparse."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a loader setting such as site=north (KEY=VALUE)")
    return key.strip(), value


def _source_options(args: argparse.Namespace) -> SourceOptions:
    """How the worker reads its own data, from the own-data flags; the group size is the worker's."""
    return SourceOptions(
        image_size=args.image_size,
        channels=args.channels,
        label_column=args.label_column,
        feature_columns=args.feature_columns,
        categorical_columns=args.categorical_columns,
        missing=args.missing,
        label_type=args.label_type,
        data_args=dict(args.data_arg),
        min_group_size=args.min_group_size,
    )


#: The special cases of :func:`config_from_args`: WorkerConfig fields that are not simply the flag of their
#: name, because the flag is named otherwise, its text is parsed, or the value is derived.
CONFIG_FROM_FLAGS: Final[dict[str, FromFlags | None]] = {
    "worker_id": lambda args: args.id,
    "testing": lambda args: args.testing or args.id == "testing",
    "digits": lambda args: parse_classes(args.digits) if args.digits else None,
    "shard": lambda args: parse_shard(args.shard) if args.shard else None,
    "datasets": lambda args: tuple(parse_dataset_spec(text) for text in args.dataset_spec),
    "source_options": _source_options,
    "models": lambda args: tuple(args.model),
    "tasks": lambda args: tuple(args.task),
    "download": lambda args: not args.no_download,
    "idle_timeout": lambda args: args.idle_timeout or None,  # 0: never
    "share_cores": lambda args: args.threads is None,
    "dp_sgd_noise_multiplier": lambda args: args.dp_sgd,
    "allow_coordinators": lambda args: tuple(args.allow_coordinator),
}


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The worker's config from the parsed flags; see :data:`CONFIG_FROM_FLAGS` for what is not one flag's value.

    Raises:
        ConfigError: if a flag's text cannot be parsed or the settings do not make a valid worker.
    """
    return config_from_flags(WorkerConfig, args, CONFIG_FROM_FLAGS)


def _describe(config: WorkerConfig, holding: Holding, digits: str | None) -> list[str]:
    """What the worker says it holds at start: examples per class, then what it holds out for validation.

    Raises:
        ConfigError: if the data set holds no examples.
    """
    counts = holding.data.histogram()
    if holding.validation is not None:
        counts = [a + b for a, b in zip(counts, holding.validation.histogram(), strict=True)]
    total = sum(counts)
    where = f" of data set {holding.spec.key}" if holding.spec is not None else ""
    if total == 0:
        raise ConfigError(f"worker {config.worker_id} holds no examples{where} of digits {digits}")
    split = holding.spec.split if holding.spec is not None else "test" if config.testing else "train"
    role = "test" if split == "test" else "training"
    listed = ", ".join(f"{label}: {count}" for label, count in enumerate(counts) if count)
    held = group_label([label for label, count in enumerate(counts) if count])
    named = f" as data set {holding.spec.key} ({holding.version})" if holding.spec is not None else ""
    lines = [
        f"{config.worker_id} holds {total} {role} examples of {holding.data.name}{named}, digits {held} ({listed})"
    ]
    return lines + _held_out(config, holding.validation_size, len(holding.data))


#: The most classes a worker names, with their counts, when it starts.
LISTED_CLASSES: Final = 20


def _describe_own(config: WorkerConfig, holding: SourceHolding) -> list[str]:
    """What a worker with its own data says it holds at start: the spec, the examples per class, the hold-out."""
    examples = np.concatenate([holding.train, holding.held])
    classes = holding.schema.classes
    if classes is None:
        label = "a continuous label"
    else:
        counts = np.bincount(holding.source.labels[examples], minlength=len(classes))
        listed = [f"{name}: {count}" for name, count in zip(classes, counts, strict=True)]
        more = f" and {len(listed) - LISTED_CLASSES} more" if len(listed) > LISTED_CLASSES else ""
        label = f"classes {', '.join(listed[:LISTED_CLASSES])}{more}"
    role = "test" if holding.split == "test" else "training"
    spec = config.data if holding.spec is None else f"{holding.spec.source} as data set {holding.spec.key}"
    lines = [
        f"{config.worker_id} holds {len(examples)} {role} examples of {holding.name} from {spec}"
        f" ({holding.version}), {label}"
    ]
    return lines + _held_out(config, holding.validation_size, len(holding.train))


def _held_out(config: WorkerConfig, validation_size: int, trained: int) -> list[str]:
    """The start-up line on the validation hold-out, when there is one."""
    if not validation_size:
        return []
    return [
        f"{config.worker_id} holds out {validation_size} of them for validation"
        f" (--val-fraction {config.val_fraction:g}) and trains on {trained}"
    ]


def _warn_oversubscribed(worker_id: str, threads: int) -> None:
    """One line when a fixed ``--threads`` is more than this worker's share of the cores, counted now."""
    cores, workers = available_cores(), count_workers()
    share = fair_threads(cores, workers, threads)
    if threads > share:
        print(
            f"WARNING: {worker_id} runs --threads {threads}, more than its share of {cores} cores among"
            f" {counted(workers, 'syncfed worker')} on this machine: leave --threads out to take {share}",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line."""
    return run_program(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return fail(PROGRAM, exc)
    if args.id is None:
        parser.error("the following arguments are required: --id (or id in --config)")
    setup_logging(args.verbose, default=20)
    try:
        config = config_from_args(args)
        if config.attack is not None:
            print(
                f"WARNING: TEST HOOK --attack {config.attack}: this worker {ATTACKS[config.attack]}"
                " instead of its real update",
                file=sys.stderr,
                flush=True,
            )
        if config.policy is not None:
            load_policy(config.policy)  # a bad file stops the worker before it reads its data
            print(f"{config.worker_id} serves only the jobs its site policy {config.policy} allows", flush=True)
        keep_freed_memory()  # before the compute thread: round after round, its buffers reuse the same pages
        with registered():  # counted among this machine's workers, which share its cores
            if config.threads is not None:
                _warn_oversubscribed(config.worker_id, config.threads)
            holdings = load_holdings(config)
            for holding in holdings:
                described = (
                    _describe_own(config, holding)
                    if isinstance(holding, SourceHolding)
                    else _describe(config, holding, args.digits)
                )
                for line in described:
                    print(line, flush=True)
            if config.dp_sgd_noise_multiplier is not None:
                print(
                    f"{config.worker_id} trains with DP-SGD: noise multiplier {config.dp_sgd_noise_multiplier:g},"
                    f" clip {config.dp_sgd_clip:g}, epsilon reported at delta {config.dp_sgd_delta:g}",
                    flush=True,
                )
            # Loaded once the data has: a bad file is refused in well under a second, not after torch's load.
            import torch

            from ..worker.dialer import dial_out
            from ..worker.server import Worker, run_worker

            if config.threads is not None:
                torch.set_num_threads(config.threads)
            say = partial(print, flush=True)
            work = (
                dial_out(Worker(config, holdings), report=say)
                if config.connect is not None
                else run_worker(config, holdings, ready=say)
            )
            if not args.exit_with_stdin:
                asyncio.run(work)
            elif asyncio.run(until_input_ends(work)):
                print(f"{PROGRAM}: standard input ended (--exit-with-stdin): stopped", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: stopped", file=sys.stderr)
        return INTERRUPTED
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except BrokenPipeError:
        return stdout_closed()
    except OSError as exc:  # the port is taken, the host does not resolve
        print(f"{PROGRAM}: error: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
